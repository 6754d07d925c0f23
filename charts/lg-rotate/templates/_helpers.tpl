{{/*
Labels every object carries: the kustomize tree's part-of label (cronjob/base) and Helm's own.
Object names are fixed, as in the kustomize tree: the RBAC resourceNames, the Leases
(lg-rotate-<secret>, lg-rotate-controller-<secret>) and the admission policies name them, so one
release per namespace (a second namespace: admissionPolicies.create=false, they are shared).
*/}}
{{- define "lg-rotate.labels" -}}
app.kubernetes.io/part-of: linuxguard
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given (pin it in production). */}}
{{- define "lg-rotate.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* The agent pods' labels, from agent.selector ("k=v,k2=v2"). */}}
{{- define "lg-rotate.agentLabels" -}}
{{- range splitList "," .Values.agent.selector }}
{{ (splitList "=" .) | first | trim }}: {{ (splitList "=" .) | last | trim | quote }}
{{- end }}
{{- end }}

{{/* The store identity of every ServiceAccount: IRSA (aws) or Workload Identity (gcp). */}}
{{- define "lg-rotate.serviceAccountAnnotations" -}}
{{- if and (eq .Values.provider "aws") .Values.aws.roleArn }}
annotations:
  eks.amazonaws.com/role-arn: {{ .Values.aws.roleArn }}
{{- else if and (eq .Values.provider "gcp") .Values.gcp.serviceAccount }}
annotations:
  iam.gke.io/gcp-service-account: {{ .Values.gcp.serviceAccount }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress to the store, per provider (the kustomize overlays' patches). */}}
{{- define "lg-rotate.storeEgress" -}}
{{- if eq .Values.provider "vault" }}
# Vault: its pods in vault.egress.namespace with vault.egress.podLabels. For a Vault outside
# the cluster, set vault.egress.cidr instead.
- to:
    {{- if .Values.vault.egress.cidr }}
    - ipBlock:
        cidr: {{ .Values.vault.egress.cidr }}
    {{- else }}
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .Values.vault.egress.namespace }}
      podSelector:
        matchLabels:
          {{- toYaml .Values.vault.egress.podLabels | nindent 10 }}
    {{- end }}
  ports:
    - protocol: TCP
      port: {{ .Values.vault.egress.port }}
{{- else }}
# {{ .Values.provider | upper }} APIs: HTTPS to any address (narrow it to your VPC endpoints or
# Private Google Access range in networkPolicy.extraEgress).
- to:
    - ipBlock:
        cidr: 0.0.0.0/0
  ports:
    - protocol: TCP
      port: 443
{{- if eq .Values.provider "gcp" }}
# The GKE metadata server (Workload Identity tokens).
- to:
    - ipBlock:
        cidr: 169.254.169.254/32
  ports:
    - protocol: TCP
      port: 80
    - protocol: TCP
      port: 988
{{- end }}
{{- end }}
{{- with .Values.networkPolicy.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end }}
