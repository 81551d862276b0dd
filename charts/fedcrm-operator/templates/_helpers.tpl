{{- define "fedcrm-operator.labels" -}}
app.kubernetes.io/name: fedcrm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: fedcrm
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "fedcrm-operator.selector" -}}
app.kubernetes.io/name: fedcrm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
