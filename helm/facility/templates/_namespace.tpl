{{- /* Everything a namespace users run in holds, in one place: the chart renders it for the
       shared namespace or for each listed user's own, and puts the same objects, rendered for
       the placeholder user __USERNAME__, into the hub's configuration (user-objects.yaml),
       from which the hub makes the namespace of a user the chart does not list.

       Pods there meet the "baseline" Pod Security Standard, may reach the hub's API, and the
       hub may start servers there. Argument: dict "root" $ "namespace" NAME "user" USER, with
       USER empty for the shared namespace. */}}
{{- define "facility.namespaceObjects" -}}
{{- $root := .root }}
{{- $namespace := .namespace }}
{{- $user := .user }}
{{- $release := $root.Release.Name }}
apiVersion: v1
kind: Namespace
metadata:
  name: {{ $namespace }}
  labels:
    {{- include "facility.namespaceLabels" (dict "root" $root "user" $user) | nindent 4 }}
{{- if $user }}
---
apiVersion: v1
kind: ResourceQuota
metadata:
  name: facility-user
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
spec:
  hard:
    {{- toYaml $root.Values.userNamespaces.quota | nindent 4 }}
---
apiVersion: v1
kind: LimitRange
metadata:
  name: facility-user
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
spec:
  limits:
    - type: Container
      {{- toYaml $root.Values.userNamespaces.limitRange | nindent 6 }}
{{- end }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: facility-hub-spawner
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $release }}-facility-hub-spawner
subjects:
  - kind: ServiceAccount
    name: {{ $root.Values.userNamespaces.hubServiceAccount }}
    namespace: {{ $root.Release.Namespace }}
{{- if $user }}
---
{{ include "facility.userAccount" (dict "root" $root "namespace" $namespace "user" $user) }}
{{- else }}
{{- range $root.Values.users }}
---
{{ include "facility.userAccount" (dict "root" $root "namespace" $namespace "user" .) }}
{{- end }}
{{- end }}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: facility-config
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
data:
  facility.yaml: |
    {{- include "facility.configFor" (list $root $namespace) | nindent 4 }}
  catalog.yaml: |
    {{- toYaml $root.Values.catalog | nindent 4 }}
---
{{ include "facility.namespaceNetwork" (dict "root" $root "namespace" $namespace) }}
---
{{ include "facility.daskNetwork" (dict "root" $root "namespace" $namespace "user" $user) }}
{{- end }}

{{- /* The labels of a namespace users run in: the admission policy and the hub's network
       rules select by them. */}}
{{- define "facility.namespaceLabels" -}}
{{ include "facility.labels" .root }}
pod-security.kubernetes.io/enforce: baseline
hub.jupyter.org/network-access-hub: "true"
facility.dev/user-pods: "true"
{{- if .user }}
facility.dev/user: {{ .user | quote }}
{{- end }}
{{- end }}

{{- /* A user's own account (facility-user-<user>), with the users' role in the namespace: the
       admission policies let an account touch only its own user's Dask objects and Secrets,
       which keeps users apart in a shared namespace too. Argument: dict "root" $ "namespace"
       NAME "user" USER. */}}
{{- define "facility.userAccount" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: facility-user-{{ .user }}
  namespace: {{ .namespace }}
  labels:
    {{- include "facility.labels" .root | nindent 4 }}
    facility.dev/user: {{ .user | quote }}
automountServiceAccountToken: true
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: facility-user-{{ .user }}
  namespace: {{ .namespace }}
  labels:
    {{- include "facility.labels" .root | nindent 4 }}
    facility.dev/user: {{ .user | quote }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ .root.Release.Name }}-facility-user
subjects:
  - kind: ServiceAccount
    name: facility-user-{{ .user }}
    namespace: {{ .namespace }}
{{- end }}
