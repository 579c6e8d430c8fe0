{{/*
Labels Helm's conventions add to every object's metadata; the pods and the
selectors keep only `app` (as config/ has them: selectors cannot change on
upgrade, and the mc-<cluster> Services select app=tower).
*/}}
{{- define "tower.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tower.proxyLabels" -}}
app: tower
{{ include "tower.labels" . }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "tower.agentLabels" -}}
app: tower-agent
{{ include "tower.labels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "tower.image" -}}
{{ printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
{{- end }}

{{- define "tower.proxy" -}}
{{- if not (has .Values.mode (list "proxy" "agent")) -}}
{{- fail (printf "mode must be proxy or agent, not %q" (toString .Values.mode)) -}}
{{- end -}}
{{- eq .Values.mode "proxy" | ternary "true" "" -}}
{{- end }}

{{- define "tower.agent" -}}
{{- eq .Values.mode "agent" | ternary "true" "" -}}
{{- end }}

{{/* Pod spec parts both Deployments share. */}}
{{- define "tower.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tower.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}
