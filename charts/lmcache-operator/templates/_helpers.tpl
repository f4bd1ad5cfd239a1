{{/* Chart name, truncated to 63 characters. */}}
{{- define "lmcache-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release + chart unless the release name already contains the chart name. */}}
{{- define "lmcache-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lmcache-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the chart. */}}
{{- define "lmcache-operator.labels" -}}
helm.sh/chart: {{ include "lmcache-operator.chart" . }}
{{ include "lmcache-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lmcache-k8s
{{- end }}

{{/* Selector of the operator pod (immutable in the Deployment). */}}
{{- define "lmcache-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmcache-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lmcache-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmcache-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lmcache-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The namespaces the operator watches, as a JSON list; empty = all namespaces. */}}
{{- define "lmcache-operator.watchedNamespaces" -}}
{{- if eq .Values.watch.scope "release" }}
{{- list .Release.Namespace | toJson }}
{{- else if eq .Values.watch.scope "namespaces" }}
{{- if not .Values.watch.namespaces }}
{{- fail "watch.scope is \"namespaces\" but watch.namespaces is empty: list the namespaces to watch, or use scope \"cluster\" or \"release\"" }}
{{- end }}
{{- .Values.watch.namespaces | uniq | toJson }}
{{- else }}
{{- list | toJson }}
{{- end }}
{{- end }}

{{/* Fails with a clear message when a Prometheus Operator kind is asked for without its API. */}}
{{- define "lmcache-operator.requireMonitoringApi" -}}
{{- if not (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}
{{- fail (printf "%s needs the Prometheus Operator CRDs (API monitoring.coreos.com/v1), which this cluster does not serve: install them first, or disable %s (with `helm template`, pass --api-versions monitoring.coreos.com/v1)" .what .what) }}
{{- end }}
{{- end }}

{{/* Rules the operator needs in each namespace it watches (see rbac.yaml). */}}
{{- define "lmcache-operator.namespacedRules" -}}
- apiGroups: ["lmcache.dev"]
  resources: ["lmcacheclusters", "vllmdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["lmcache.dev"]
  resources: ["lmcacheclusters/status", "vllmdeployments/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["create", "patch"]
- apiGroups: ["apps"]
  resources: ["daemonsets", "deployments"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["create", "patch", "delete"]
{{- end }}
