{{/*
The reconcilers' grace period against their interval (docs/operations.md), checked at render
time with the same rule the driver applies at start: at least the interval, and in a deleting
mode at least 30 seconds and twice the interval. Arguments: (list name values deleting).
*/}}
{{- define "nodelocal-csi.reconcileGrace" -}}
{{- $name := index . 0 }}
{{- $v := index . 1 }}
{{- $grace := int $v.gracePeriodSeconds }}
{{- $interval := int $v.intervalSeconds }}
{{- if lt $grace $interval }}
{{- fail (printf "%s.gracePeriodSeconds (%d) must be at least %s.intervalSeconds (%d)" $name $grace $name $interval) }}
{{- end }}
{{- if and (index . 2) (or (lt $grace 30) (lt $grace (mul 2 $interval))) }}
{{- fail (printf "%s: deleting needs gracePeriodSeconds of at least 30 and twice intervalSeconds (%d), got %d" $name $interval $grace) }}
{{- end }}
{{- end }}
