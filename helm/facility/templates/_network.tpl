{{- /* What users' pods (servers, Dask pods, batch job pods) may reach and be reached by, in
       each namespace they run in. Everything is denied unless a rule below (or the Dask
       policies of networkpolicy.yaml) allows it. Pods are chosen by labels and namespaces,
       never by address: some network plugins (Cilium) do not match pod addresses in ipBlock
       rules. Addresses are used only for what is outside the cluster: the Kubernetes API
       server, and the internet minus private ranges and the cloud metadata server. */}}
{{- define "facility.namespaceNetwork" -}}
{{- $root := .root }}
{{- $namespace := .namespace }}
{{- $np := $root.Values.networkPolicy }}
{{- $release := $root.Release.Namespace }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: facility-default-deny
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: facility-servers
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
spec:
  # a user's server takes requests from the proxy (the user's browser) and the hub only
  podSelector:
    matchLabels: {component: singleuser-server}
  policyTypes: [Ingress]
  ingress:
    - from:
        - namespaceSelector:
            matchLabels: {kubernetes.io/metadata.name: {{ $release }}}
          podSelector:
            matchExpressions:
              - {key: component, operator: In, values: [proxy, hub]}
      ports:
        - {port: 8888, protocol: TCP}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: facility-egress
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
    # names
    - to:
        - namespaceSelector:
            matchLabels: {kubernetes.io/metadata.name: {{ $np.dns.namespace }}}
          podSelector:
            matchLabels:
              {{- toYaml $np.dns.podLabels | nindent 14 }}
      ports:
        - {port: 53, protocol: UDP}
        - {port: 53, protocol: TCP}
    # the hub's API (tokens, activity)
    - to:
        - namespaceSelector:
            matchLabels: {kubernetes.io/metadata.name: {{ $release }}}
          podSelector:
            matchLabels: {component: hub}
      ports:
        - {port: 8081, protocol: TCP}
    # the namespace's own pods: a server to its Dask scheduler, workers to each other (what
    # each pod accepts is decided by its ingress rules)
    - to:
        - podSelector: {}
    # the Kubernetes API (Dask clusters and jobs are made through it)
    - to:
        {{- range (required "networkPolicy.apiServerCIDRs: set the Kubernetes API server's addresses (kubectl get endpoints kubernetes -n default); users' notebooks make their Dask clusters through it" $np.apiServerCIDRs) }}
        - ipBlock: {cidr: {{ . }}}
        {{- end }}
      ports:
        - {port: 443, protocol: TCP}
        - {port: 6443, protocol: TCP}
    # data and software from outside the cluster; never private addresses (other services of
    # the cluster and its nodes) nor the cloud metadata server, unless listed in allowedCIDRs
    - to:
        - ipBlock:
            cidr: 0.0.0.0/0
            except:
              {{- toYaml $np.privateCIDRs | nindent 14 }}
        {{- range $np.allowedCIDRs }}
        - ipBlock: {cidr: {{ . }}}
        {{- end }}
{{- end }}

{{- /* Who may reach Dask schedulers and workers. In a user's own namespace: only that
       namespace's pods (the user's server and the cluster's own pods) and the operator. In a
       shared namespace, for each known user: only pods labelled with that user; for other users
       (policies select disjoint pods, since policies add up): only the namespace's notebook and
       Dask pods, each cluster then being closed to others by its own mutual-TLS credentials. */}}
{{- define "facility.daskNetwork" -}}
{{- $root := .root }}
{{- $namespace := .namespace }}
{{- $operator := include "facility.operatorNamespace" $root }}
{{- $scrapers := list }}
{{- if $root.Values.monitoring.enabled }}
{{- $scrapers = list (dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" $root.Values.monitoring.prometheusNamespace))) }}
{{- end }}
{{- $daskPods := dict "matchExpressions" (list (dict "key" "dask.org/cluster-name" "operator" "Exists")) }}
{{- $fromOperator := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" $operator)) "podSelector" (dict "matchLabels" (dict "app.kubernetes.io/name" "dask-kubernetes-operator")) }}
{{- if .user }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: facility-dask
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
spec:
  podSelector:
    {{- toYaml $daskPods | nindent 4 }}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: {}
        - {{- toYaml $fromOperator | nindent 10 }}
        {{- with $scrapers }}
    - from: {{- toYaml . | nindent 8 }}
      ports:
        - {port: http-dashboard, protocol: TCP}
        {{- end }}
{{- else }}
{{- range $root.Values.users }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: facility-dask-{{ . }}
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      facility.dev/user: {{ . | quote }}
    {{- toYaml (omit $daskPods "matchLabels") | nindent 4 }}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector:
            matchLabels:
              facility.dev/user: {{ . | quote }}
        - {{- toYaml $fromOperator | nindent 10 }}
        {{- with $scrapers }}
    - from: {{- toYaml . | nindent 8 }}
      ports:
        - {port: http-dashboard, protocol: TCP}
        {{- end }}
---
{{- end }}
{{- $others := list (dict "key" "dask.org/cluster-name" "operator" "Exists") }}
{{- if $root.Values.users }}
{{- $others = append $others (dict "key" "facility.dev/user" "operator" "NotIn" "values" $root.Values.users) }}
{{- end }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: facility-dask
  namespace: {{ $namespace }}
  labels:
    {{- include "facility.labels" $root | nindent 4 }}
spec:
  podSelector:
    matchExpressions:
      {{- toYaml $others | nindent 6 }}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector:
            matchExpressions:
              - {key: facility.dev/user, operator: Exists}
        - {{- toYaml $fromOperator | nindent 10 }}
        {{- with $scrapers }}
    - from: {{- toYaml . | nindent 8 }}
      ports:
        - {port: http-dashboard, protocol: TCP}
        {{- end }}
{{- end }}
{{- end }}
