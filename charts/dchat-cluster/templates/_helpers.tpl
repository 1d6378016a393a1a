{{/* DchatCluster name. */}}
{{- define "dchat-cluster.name" -}}
{{- default .Release.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* Database Secret name, or empty for the embedded store. */}}
{{- define "dchat-cluster.dbSecret" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else if .Values.database.create }}
{{- default (printf "%s-db" (include "dchat-cluster.name" .)) .Values.database.secretName }}
{{- end }}
{{- end }}

{{/* Standard labels. */}}
{{- define "dchat-cluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: dchat-relay
app.kubernetes.io/instance: {{ include "dchat-cluster.name" . }}
app.kubernetes.io/part-of: dchat
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
