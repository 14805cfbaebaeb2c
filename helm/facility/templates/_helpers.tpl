{{/* Labels every object of the facility carries. */}}
{{- define "facility.labels" -}}
app.kubernetes.io/name: facility
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Per-user namespaces are on when the facility configuration names a template for them. */}}
{{- define "facility.userNamespaceTemplate" -}}
{{- .Values.facility.cluster.kubernetes.user_namespace_template | default "" -}}
{{- end }}

{{/* The namespaces users' servers and clusters run in, one per line: each user's own, or the
     one they share (facility.cluster.kubernetes.namespace). Never the hub's own namespace: a
     user's pods there could reach the hub's secrets. */}}
{{- define "facility.userNamespaces" -}}
{{- $template := include "facility.userNamespaceTemplate" . -}}
{{- if $template -}}
{{- range .Values.users }}
{{ replace "{username}" . $template }}
{{- end }}
{{- else }}
{{- $shared := .Values.facility.cluster.kubernetes.namespace | default "" }}
{{- if or (not $shared) (eq $shared .Release.Namespace) }}
{{- fail (printf "facility.cluster.kubernetes.namespace (%q): set a namespace for users' servers and Dask clusters other than the hub's namespace %q" $shared .Release.Namespace) }}
{{- end }}
{{ $shared }}
{{- end }}
{{- end }}

{{/* The facility configuration as seen in one namespace (its clusters run there; the hub's
     copy keeps the configured namespace). */}}
{{- define "facility.configFor" -}}
{{- $ := index . 0 -}}
{{- $namespace := index . 1 -}}
{{- $hub := $.Values.facility.hub | default dict -}}
{{- $vo := $hub.vo | default dict -}}
{{- $_ := required "facility.hub.vo.issuer: set the VO's OpenID issuer URL (the hub signs users in there)" $vo.issuer -}}
{{- $_ := required "facility.hub.public_url: set the address users open, e.g. https://hub.example.org" $hub.public_url -}}
{{- $pinned := dict "cluster" (dict "kubernetes" (dict "namespace" $namespace)) -}}
{{- toYaml (mergeOverwrite (deepCopy $.Values.facility) $pinned) -}}
{{- end }}

{{- /* Where the dask-kubernetes operator runs: the release namespace when this chart deploys
       it, else the namespace it was installed in (networkPolicy.operatorNamespace). */}}
{{- define "facility.operatorNamespace" -}}
{{- $given := .Values.networkPolicy.operatorNamespace -}}
{{- if (index .Values "dask-kubernetes-operator").enabled -}}
{{- if and $given (ne $given .Release.Namespace) -}}
{{- fail (printf "networkPolicy.operatorNamespace (%s) names an operator installed outside this chart, but dask-kubernetes-operator.enabled deploys it in %s: unset one of them" $given .Release.Namespace) -}}
{{- end -}}
{{- .Release.Namespace -}}
{{- else -}}
{{- required "networkPolicy.operatorNamespace: the namespace of the dask-kubernetes operator installed outside this chart (dask-kubernetes-operator.enabled is false)" $given -}}
{{- end -}}
{{- end }}
