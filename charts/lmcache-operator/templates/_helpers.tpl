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
{{- .Values.watchNamespaces | default list | uniq | toJson }}
{{- end }}

{{/* `lmcache-operator run` flags of the guard rails (allowedHostPathPrefixes,
allowPrivilegedPassThrough), one YAML list item per flag, for the container's args. */}}
{{- define "lmcache-operator.policyArgs" -}}
{{- range .Values.allowedHostPathPrefixes }}
- --allowed-host-path-prefix={{ . }}
{{- end }}
{{- if .Values.allowPrivilegedPassThrough }}
- --allow-privileged-pass-through
{{- end }}
{{- end }}

{{- define "lmcache-operator.nodeImageArgs" -}}
- --node-image-repository={{ .Values.nodeImage.repository }}
- --node-image-version={{ .Values.nodeImage.version | default .Chart.AppVersion }}
- --cuda-runtime-class={{ .Values.nodeImage.cudaRuntimeClassName }}
{{- end }}

{{/* "true" when the webhook's certificate comes from cert-manager (webhook.certificates:
cert-manager, or auto with cert-manager.io/v1 served), else "false" (Helm generates one). */}}
{{- define "lmcache-operator.webhookCertManager" -}}
{{- $mode := .Values.webhook.certificates -}}
{{- if eq $mode "cert-manager" }}true
{{- else if eq $mode "self-signed" }}false
{{- else }}{{ .Capabilities.APIVersions.Has "cert-manager.io/v1" }}
{{- end }}
{{- end }}

{{/* namespaceSelector of a webhook entry: the watched namespaces, or every namespace but the
system ones, the `exclude` list and webhook.excludeNamespaces; `labelled`: only namespaces
labelled lmcache.dev/cluster. */}}
{{- define "lmcache-operator.webhookNamespaces" -}}
matchExpressions:
{{- if .labelled }}
  - {key: lmcache.dev/cluster, operator: Exists}
{{- end }}
{{- if .namespaces }}
  - key: kubernetes.io/metadata.name
    operator: In
    values: {{ .namespaces | toJson }}
{{- else }}
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values: {{ concat (list "kube-system" "kube-public" "kube-node-lease") .exclude .root.Values.webhook.excludeNamespaces | uniq | toJson }}
{{- end }}
{{- end }}

{{/* Fails with a clear message when a Prometheus Operator kind is asked for without its API. */}}
{{- define "lmcache-operator.requireMonitoringApi" -}}
{{- if not (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}
{{- fail (printf "%s needs the Prometheus Operator CRDs (API monitoring.coreos.com/v1), which this cluster does not serve: install them first, or disable %s (with `helm template`, pass --api-versions monitoring.coreos.com/v1)" .what .what) }}
{{- end }}
{{- end }}

{{/* Rules the operator needs in each namespace it watches (the table in rbac.yaml). */}}
{{- define "lmcache-operator.namespacedRules" -}}
- apiGroups: ["lmcache.dev"]
  resources: ["lmcacheclusters"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["lmcache.dev"]
  resources: ["vllmdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["lmcache.dev"]
  resources: ["lmcacheclusters/status", "vllmdeployments/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["daemonsets", "deployments"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["delete"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "list"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["create", "patch", "delete"]
{{- end }}

{{/* Cluster-scoped reads, granted in cluster mode only (see rbac.yaml). */}}
{{- define "lmcache-operator.clusterRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- if and .Values.webhook.enabled .Values.webhook.namespaceLabel }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
{{- end }}
{{- end }}
