{{- /*
A Kubernetes name bounded as the operator bounds it (operator/fedcrm_operator/naming.py, _bounded): a name over the
limit keeps a prefix and gains 8 hex digits of its SHA-256. Argument: (list name limit).
*/ -}}
{{- define "fedcrm-tenant.bounded" -}}
{{- $name := index . 0 -}}
{{- $limit := index . 1 -}}
{{- if le (len $name) $limit -}}
{{- $name -}}
{{- else -}}
{{- printf "%s-%s" (regexReplaceAll "-+$" (trunc (int (sub $limit 9)) $name) "") (trunc 8 (sha256sum $name)) -}}
{{- end -}}
{{- end -}}

{{- /* The name of the certificate Secret the operator creates here for this chart's Participant
(Names.client_secret: <federation>-<participant>, at most 50 characters, then -tls). */ -}}
{{- define "fedcrm-tenant.certificateSecret" -}}
{{- $prefix := include "fedcrm-tenant.bounded" (list (printf "%s-%s" .Values.participant.federation.name .Values.participant.name) 50) -}}
{{- include "fedcrm-tenant.bounded" (list (printf "%s-tls" $prefix) 63) -}}
{{- end -}}
