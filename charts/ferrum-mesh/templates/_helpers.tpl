{{/* The revision suffix ("" or "-<revision>") of names that must not clash between revisions. */}}
{{- define "ferrum.suffix" -}}
{{- if .Values.revision }}-{{ .Values.revision }}{{ end -}}
{{- end }}

{{/* Labels on everything this release installs. */}}
{{- define "ferrum.labels" -}}
app.kubernetes.io/part-of: ferrum-mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- if .Values.revision }}
ferrum.dev/rev: {{ .Values.revision | quote }}
{{- end }}
{{- end }}

{{/* A component image: image.repository/<name>:<tag or appVersion>. Args: (list $ name). */}}
{{- define "ferrum.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s:%s" $root.Values.image.repository (index . 1) (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end }}

{{/* The operator's in-cluster DNS name (its CA certificate carries it). */}}
{{- define "ferrum.operatorHost" -}}
{{- printf "ferrum-operator%s.%s.svc" (include "ferrum.suffix" .) .Release.Namespace -}}
{{- end }}

{{/* Pod scheduling and pull secrets for a component's values. Args: (list $ componentValues). */}}
{{- define "ferrum.scheduling" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
{{- with $root.Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A container's security settings: non-root, read-only, no capabilities. */}}
{{- define "ferrum.securityContext" -}}
runAsNonRoot: true
runAsUser: 1337
runAsGroup: 1337
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
