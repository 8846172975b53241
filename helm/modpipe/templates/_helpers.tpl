{{/* Chart name. */}}
{{- define "modpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, at most 63 characters. */}}
{{- define "modpipe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "modpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "modpipe.labels" -}}
helm.sh/chart: {{ include "modpipe.chart" . }}
{{ include "modpipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modpipe
{{- end }}

{{- define "modpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Name of one component's objects: <fullname>-<component>. */}}
{{- define "modpipe.componentName" -}}
{{- printf "%s-%s" (include "modpipe.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modpipe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modpipe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret with the Redis password: an existing one, or (trials) one the chart creates from redis.auth.password. */}}
{{- define "modpipe.redisSecretName" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if .Values.redis.auth.password }}
{{- include "modpipe.componentName" (dict "root" . "component" "secrets") }}
{{- else }}
{{- fail "redis.auth.existingSecret is required: the name of an existing Secret holding the Redis password (key redis.auth.passwordKey); for trials only, redis.auth.password makes the chart create one" }}
{{- end }}
{{- end }}

{{- define "modpipe.kafkaBootstrapServers" -}}
{{- if .Values.kafka.bundled.enabled }}
{{- printf "%s:9092" (include "modpipe.componentName" (dict "root" . "component" "kafka")) }}
{{- else }}
{{- required "kafka.bootstrapServers is required (or set kafka.bundled.enabled)" .Values.kafka.bootstrapServers }}
{{- end }}
{{- end }}

{{- define "modpipe.redisUrl" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://%s:6379/0" (include "modpipe.componentName" (dict "root" . "component" "redis")) }}
{{- else }}
{{- required "redis.url is required (or set redis.bundled.enabled)" .Values.redis.url }}
{{- end }}
{{- end }}

{{- define "modpipe.tritonHost" -}}
{{- include "modpipe.componentName" (dict "root" . "component" "triton") }}
{{- end }}

{{- define "modpipe.tritonGrpcUrl" -}}
{{- if .Values.config.triton.grpcUrl }}
{{- .Values.config.triton.grpcUrl }}
{{- else if .Values.triton.enabled }}
{{- printf "%s:8001" (include "modpipe.tritonHost" .) }}
{{- else }}
{{- fail "config.triton.grpcUrl is required when triton.enabled is false" }}
{{- end }}
{{- end }}

{{- define "modpipe.tritonHttpUrl" -}}
{{- if .Values.config.triton.httpUrl }}
{{- .Values.config.triton.httpUrl }}
{{- else if .Values.triton.enabled }}
{{- printf "%s:8000" (include "modpipe.tritonHost" .) }}
{{- else }}
{{- fail "config.triton.httpUrl is required when triton.enabled is false" }}
{{- end }}
{{- end }}

{{/* Settings of every modpipe container: the ConfigMap. Secrets come as files (modpipe.secretVolume). */}}
{{- define "modpipe.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "modpipe.componentName" (dict "root" . "component" "config") }}
{{- end }}

{{/*
Entrypoint of every modpipe container: export each mounted secret file into its MODPIPE_* variable, then exec
modpipe with the container's args. The secret never appears in the pod spec; a missing required file stops the
container with an error (CrashLoopBackOff names it) instead of starting without a password.
*/}}
{{- define "modpipe.command" -}}
{{- $dir := .Values.secretFiles.mountPath -}}
command:
  - /bin/sh
  - -c
  - >-
    set -eu;
    MODPIPE_REDIS__PASSWORD="$(cat {{ $dir }}/redis-password)"; export MODPIPE_REDIS__PASSWORD;
    if [ -f {{ $dir }}/review-admin-token ]; then
    MODPIPE_REVIEW__ADMIN_TOKEN="$(cat {{ $dir }}/review-admin-token)"; export MODPIPE_REVIEW__ADMIN_TOKEN; fi;
    if [ -f {{ $dir }}/webhook-signing-key ]; then
    MODPIPE_WEBHOOKS__SIGNING_KEY="$(cat {{ $dir }}/webhook-signing-key)"; export MODPIPE_WEBHOOKS__SIGNING_KEY; fi;
    exec modpipe "$@"
  - modpipe
{{- end }}

{{/* The projected Secret volume behind modpipe.command: fixed file names whatever the Secrets' keys are. */}}
{{- define "modpipe.secretVolume" -}}
{{ include "modpipe.secretVolumeWith" (dict "root" . "webhooks" false) }}
{{- end }}

{{/* The same volume plus the webhook signing key, for the webhook deliverer's pods only. */}}
{{- define "modpipe.secretVolumeWith" -}}
{{- $root := .root -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ include "modpipe.redisSecretName" $root }}
          items:
            - key: {{ $root.Values.redis.auth.passwordKey }}
              path: redis-password
      {{- with $root.Values.secretFiles.reviewAdminTokenSecret }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ $root.Values.secretFiles.reviewAdminTokenKey }}
              path: review-admin-token
      {{- end }}
      {{- if .webhooks }}
      - secret:
          name: {{ required "webhooks.enabled needs secretFiles.webhookSigningKeySecret: a Secret holding the key webhook secrets are derived from" $root.Values.secretFiles.webhookSigningKeySecret }}
          items:
            - key: {{ $root.Values.secretFiles.webhookSigningKeyKey }}
              path: webhook-signing-key
      {{- end }}
{{- end }}

{{- define "modpipe.secretMount" -}}
- name: secrets
  mountPath: {{ .Values.secretFiles.mountPath }}
  readOnly: true
{{- end }}

{{/* Topic a worker role (or the webhook deliverer) consumes, and its consumer group: what KEDA measures the lag of. */}}
{{- define "modpipe.roleTopic" -}}
{{- $topics := dict "triage" "content.incoming" "reasoning" "moderation.escalations" "review-intake" "moderation.review" "webhooks" "moderation.verdicts" -}}
{{- printf "%s%s" .root.Values.kafka.topicPrefix (required (printf "unknown worker role %q" .role) (get $topics .role)) }}
{{- end }}

{{- define "modpipe.consumerGroup" -}}
{{- printf "%smodpipe-%s" .root.Values.kafka.topicPrefix .role }}
{{- end }}

{{/* Writable folders for a read-only root filesystem: state/Faust data, /tmp and $HOME caches. */}}
{{- define "modpipe.writableVolumes" -}}
- name: state
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end }}

{{- define "modpipe.writableMounts" -}}
- name: state
  mountPath: /var/lib/modpipe
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/modpipe
{{- end }}

{{/* Pod annotations that restart pods when the settings change. */}}
{{- define "modpipe.configChecksum" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
