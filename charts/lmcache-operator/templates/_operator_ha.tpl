{{/* Replicas of the operator: .Values.replicaCount when set (values.schema.json), else 2. */}}
{{- define "lmcache-operator.replicas" -}}
{{- if hasKey .Values "replicaCount" }}{{ .Values.replicaCount }}{{ else }}2{{ end }}
{{- end }}
