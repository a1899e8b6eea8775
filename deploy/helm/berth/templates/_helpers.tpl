{{/* Labels every object carries. */}}
{{- define "berth.labels" -}}
app.kubernetes.io/name: berth
app.kubernetes.io/part-of: berth
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The driver's directory under kubelet's plugins/: Berth's CSI socket and its stage records. */}}
{{- define "berth.pluginDir" -}}
{{ trimSuffix "/" .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end }}

{{/* "repository:tag" of an image entry; the tag may be given as a second element (a default). */}}
{{- define "berth.image" -}}
{{- $image := index . 0 -}}
{{ $image.repository }}:{{ $image.tag | default (index . 1) }}
{{- end }}

{{/* Berth's config as JSON: values.config (YAML text or a mapping) with driver_name and node.state_dir filled in. */}}
{{- define "berth.configData" -}}
{{- $config := .Values.config | default dict -}}
{{- if kindIs "string" $config -}}
{{- $config = fromYaml $config -}}
{{- if hasKey $config "Error" -}}
{{- fail (printf "config is not valid YAML: %s" $config.Error) -}}
{{- end -}}
{{- else -}}
{{- $config = deepCopy $config -}}
{{- end -}}
{{- if and $config.driver_name (ne $config.driver_name .Values.driverName) -}}
{{- $message := "config.driver_name %q differs from driverName %q: set driverName only" -}}
{{- fail (printf $message $config.driver_name .Values.driverName) -}}
{{- end -}}
{{- $_ := set $config "driver_name" .Values.driverName -}}
{{- $node := $config.node | default dict -}}
{{- $_ := set $node "state_dir" ($node.state_dir | default (include "berth.pluginDir" .)) -}}
{{- $_ := set $config "node" $node -}}
{{- toJson $config -}}
{{- end }}

{{/* Berth's config file (YAML). */}}
{{- define "berth.config" -}}
{{- include "berth.configData" . | fromJson | toYaml -}}
{{- end }}

{{/* Restarts the pods when the config changes: Berth reads it once at start-up. */}}
{{- define "berth.configChecksum" -}}
checksum/config: {{ include "berth.config" . | sha256sum }}
{{- end }}

{{/* The namespaces whose Secrets the external-attacher may read: the release's, and every CHAP Secret's. */}}
{{- define "berth.secretNamespaces" -}}
{{- $namespaces := list .Release.Namespace -}}
{{- range .Values.storageClasses -}}
{{- with .chapSecret -}}
{{- $namespaces = append $namespaces (.namespace | default $.Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $namespaces) -}}
{{- end }}

{{/* A container that needs no privileges at all. */}}
{{- define "berth.unprivileged" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end }}

{{/* A controller sidecar: image, the shared CSI socket, resources.
     Takes (dict "root" $ "name" container-name "sidecar" values-entry "args" list "podEnv" bool). */}}
{{- define "berth.sidecar" -}}
- name: {{ .name }}
  image: {{ include "berth.image" (list .sidecar.image "") }}
  imagePullPolicy: {{ .sidecar.image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ .root.Values.sidecars.logVerbosity }}
    {{- with .root.Values.sidecars.leaderElection }}
    - --leader-election
    - --leader-election-lease-duration={{ .leaseDuration }}
    - --leader-election-renew-deadline={{ .renewDeadline }}
    - --leader-election-retry-period={{ .retryPeriod }}
    {{- end }}
    {{- range .args }}
    - {{ . }}
    {{- end }}
  {{- if .podEnv }}
  env:
    - name: NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
  {{- end }}
  {{- include "berth.unprivileged" .root | nindent 2 }}
  resources:
    {{- toYaml .sidecar.resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
{{- end }}

{{/* Fails the render on values that would give a broken installation. */}}
{{- define "berth.validate" -}}
{{- $config := include "berth.configData" . | fromJson -}}
{{- $backends := $config.backends | default dict -}}
{{- $classes := list -}}
{{- range .Values.storageClasses -}}
{{- $classes = append $classes .name -}}
{{- $backend := .backend | default $config.default_backend -}}
{{- if not (hasKey $backends ($backend | default "")) -}}
{{- fail (printf "storageClasses %s: backend %q is not in config.backends" .name $backend) -}}
{{- end -}}
{{- end -}}
{{- with .Values.kubevirt.defaultVirtClass -}}
{{- if not (has . $classes) -}}
{{- fail (printf "kubevirt.defaultVirtClass %q is not in storageClasses" .) -}}
{{- end -}}
{{- end -}}
{{- end }}
