{{/*
Names, labels and the paths that several objects must agree on. Every path or name that two
objects share is derived here once, so the DaemonSet, the CSIDriver and the StorageClasses
cannot drift apart.
*/}}

{{- define "nodelocal-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "nodelocal-csi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nodelocal-csi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nodelocal-csi.labels" -}}
helm.sh/chart: {{ include "nodelocal-csi.chart" . }}
app.kubernetes.io/name: {{ include "nodelocal-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nodelocal-csi
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels; the caller passes (list $ "node") or (list $ "controller"). */}}
{{- define "nodelocal-csi.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "nodelocal-csi.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "nodelocal-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* topology.<driver name>/node, as csi_driver.config.topology_key() derives it. */}}
{{- define "nodelocal-csi.topologyKey" -}}
{{- printf "topology.%s/node" .Values.driverName }}
{{- end }}

{{/* Host directory holding the driver socket; the kubelet dials <pluginDir>/csi.sock. */}}
{{- define "nodelocal-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName }}
{{- end }}

{{- define "nodelocal-csi.registrationDir" -}}
{{- printf "%s/plugins_registry" (trimSuffix "/" .Values.kubeletDir) }}
{{- end }}

{{/* Where the socket directory is mounted inside every container of a pod. */}}
{{- define "nodelocal-csi.socketDir" -}}
/csi
{{- end }}

{{- define "nodelocal-csi.socketPath" -}}
{{- printf "%s/csi.sock" (include "nodelocal-csi.socketDir" .) }}
{{- end }}

{{- define "nodelocal-csi.lvmConfigDir" -}}
/etc/nodelocal-csi
{{- end }}

{{- define "nodelocal-csi.hostpathStorageClassName" -}}
{{- default "nodelocal-hostpath" .Values.hostpath.storageClass.name }}
{{- end }}

{{- define "nodelocal-csi.snapshotClassName" -}}
{{- default "nodelocal-snapshot" .Values.snapshots.volumeSnapshotClass.name }}
{{- end }}

{{/* The sidecars' common container settings: no privileges, read-only root. */}}
{{- define "nodelocal-csi.sidecarSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* allowedTopologies for a StorageClass restricted to some nodes; the argument is
     (list $ <node names>). */}}
{{- define "nodelocal-csi.allowedTopologies" -}}
{{- $root := index . 0 }}
{{- $nodes := index . 1 }}
{{- if $nodes }}
allowedTopologies:
  - matchLabelExpressions:
      - key: {{ include "nodelocal-csi.topologyKey" $root }}
        values:
          {{- range $nodes }}
          - {{ . | quote }}
          {{- end }}
{{- end }}
{{- end }}

{{/* A device class's StorageClass settings with the defaults filled in (every key is optional in
     values, and `default` cannot be used for booleans: it treats false as unset). Returns YAML;
     use with fromYaml. */}}
{{- define "nodelocal-csi.lvmStorageClass" -}}
{{- $sc := dict "create" true "name" "" "isDefault" false "fsType" "ext4" "reclaimPolicy" "Delete" "volumeBindingMode" "WaitForFirstConsumer" "allowedNodes" list "parameters" dict }}
{{- $sc = mergeOverwrite $sc (deepCopy (default dict .storageClass)) }}
{{- if not $sc.name }}{{ $_ := set $sc "name" (printf "nodelocal-lvm-%s" .name) }}{{ end }}
{{- toYaml $sc }}
{{- end }}

{{/* Fails the render on combinations the schema cannot express. */}}
{{- define "nodelocal-csi.validate" -}}
{{- if eq .Values.backend "lvm" }}
{{- $defaults := 0 }}
{{- $names := dict }}
{{- range .Values.lvm.deviceClasses }}
{{- if hasKey $names .name }}
{{- fail (printf "lvm.deviceClasses: the name %q is used twice" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- if .default }}{{ $defaults = add1 $defaults }}{{ end }}
{{- end }}
{{- if gt $defaults 1 }}
{{- fail "lvm.deviceClasses: at most one device class may be marked default" }}
{{- end }}
{{- if and (gt (len .Values.lvm.deviceClasses) 1) (eq $defaults 0) }}
{{- fail "lvm.deviceClasses: with several device classes, one must be marked default: true" }}
{{- end }}
{{- end }}
{{- $defaultClasses := 0 }}
{{- if and (eq .Values.backend "hostpath") .Values.hostpath.storageClass.create .Values.hostpath.storageClass.isDefault }}
{{- $defaultClasses = add1 $defaultClasses }}
{{- end }}
{{- if eq .Values.backend "lvm" }}
{{- range .Values.lvm.deviceClasses }}
{{- $sc := include "nodelocal-csi.lvmStorageClass" . | fromYaml }}
{{- if and $sc.create $sc.isDefault }}{{ $defaultClasses = add1 $defaultClasses }}{{ end }}
{{- end }}
{{- end }}
{{- if gt $defaultClasses 1 }}
{{- fail "at most one StorageClass may be marked isDefault" }}
{{- end }}
{{- end }}

{{/* The job label of the node plugins' scrape target: the PodMonitor sets it and the alerts
     select by it, so both must take it from here. */}}
{{- define "nodelocal-csi.metricsJob" -}}
{{- printf "%s-node" (include "nodelocal-csi.fullname" .) }}
{{- end }}

{{/* Whether to render an object of a Prometheus Operator kind; the argument is
     (list $ <values of the object> "<group/version/Kind>"): enabled, and either the cluster
     serves the kind or the values force it. */}}
{{- define "nodelocal-csi.monitoringEnabled" -}}
{{- $root := index . 0 }}
{{- $values := index . 1 }}
{{- if and $values.enabled (or $values.force ($root.Capabilities.APIVersions.Has (index . 2))) -}}
true
{{- end }}
{{- end }}

{{/* The startup probe of a container whose /healthz (on the named port) answers only once the
     driver has: it allows livenessProbe.startupSeconds for that first answer (a driver starting
     on a slow or busy node), and the kubelet runs the liveness probe only after it passed. A
     try lasts up to timeoutSeconds and the kubelet starts none while one runs, so the period is
     at least that long, and the tries times the period cover startupSeconds. The argument is
     (list $ "<port name>"). */}}
{{- define "nodelocal-csi.startupProbe" -}}
{{- $probe := (index . 0).Values.livenessProbe -}}
{{- $period := max 5 $probe.timeoutSeconds -}}
startupProbe:
  httpGet:
    path: /healthz
    port: {{ index . 1 }}
  initialDelaySeconds: {{ $probe.initialDelaySeconds }}
  periodSeconds: {{ $period }}
  timeoutSeconds: {{ $probe.timeoutSeconds }}
  failureThreshold: {{ max 1 (div (add $probe.startupSeconds (sub $period 1)) $period) }}
{{- end }}

{{/* The driver container's probes (node plugin and controller): the kubelet asks the
     livenessprobe sidecar on the healthz port, which runs a CSI Probe of the driver, and
     restarts the driver after livenessProbe.failureThreshold failures in a row. */}}
{{- define "nodelocal-csi.driverProbes" -}}
{{ include "nodelocal-csi.startupProbe" (list . "healthz") }}
livenessProbe:
  httpGet:
    path: /healthz
    port: healthz
  periodSeconds: {{ .Values.livenessProbe.periodSeconds }}
  timeoutSeconds: {{ .Values.livenessProbe.timeoutSeconds }}
  failureThreshold: {{ .Values.livenessProbe.failureThreshold }}
{{- end }}
