{{- define "clickvec.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "clickvec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include "clickvec.selector" (list . "worker") */}}
{{- define "clickvec.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "clickvec.image" -}}
{{- $img := .Values.image -}}
{{- if .Values.gpu.enabled }}{{ $img = .Values.gpu.image }}{{ end -}}
{{ printf "%s:%s" $img.repository $img.tag }}
{{- end -}}

{{- define "clickvec.caPath" -}}/etc/clickvec/kafka-ca/{{ .Values.kafka.tls.caSecret.key }}{{- end -}}

{{/* The worker reads every setting from CLICKVEC_<FIELD> (stream/worker/config.py). */}}
{{- define "clickvec.workerEnv" -}}
- name: CLICKVEC_MODEL
  value: {{ .Values.model.path | quote }}
- name: CLICKVEC_BROKERS
  value: {{ .Values.kafka.brokers | quote }}
- name: CLICKVEC_IN_TOPIC
  value: {{ .Values.input.topic | quote }}
- name: CLICKVEC_OUT_TOPIC
  value: {{ .Values.output.topic | quote }}
- name: CLICKVEC_DLQ_TOPIC
  value: {{ .Values.dlq.topic | quote }}
- name: CLICKVEC_GROUP
  value: {{ .Values.worker.group | quote }}
- name: CLICKVEC_REPLICATION_FACTOR
  value: {{ .Values.worker.replicationFactor | quote }}
- name: CLICKVEC_PROVIDERS
  value: {{ ternary "cuda" "cpu" .Values.gpu.enabled | quote }}
{{- if not (kindIs "invalid" .Values.worker.standbyReplicas) }}
- name: CLICKVEC_STANDBY_REPLICAS
  value: {{ .Values.worker.standbyReplicas | quote }}
{{- end }}
{{- range $field, $value := .Values.worker.settings }}
- name: {{ printf "CLICKVEC_%s" (upper $field) }}
  value: {{ $value | quote }}
{{- end }}
{{- with .Values.kafka.securityProtocol }}
- name: CLICKVEC_SECURITY_PROTOCOL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.kafka.sasl.mechanism }}
- name: CLICKVEC_SASL_MECHANISM
  value: {{ . | quote }}
{{- end }}
{{- with .Values.kafka.sasl.username }}
- name: CLICKVEC_SASL_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- with .Values.kafka.tls.caSecret.name }}
- name: CLICKVEC_SSL_CAFILE
  value: {{ include "clickvec.caPath" $ | quote }}
{{- end }}
{{- with include "clickvec.passwordEnv" . }}
{{ . }}
{{- end }}
{{- end -}}

{{- define "clickvec.passwordEnv" -}}
{{- with .Values.kafka.sasl.passwordSecret.name -}}
- name: CLICKVEC_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.kafka.sasl.passwordSecret.key }}
{{- end -}}
{{- end -}}

{{/* Connection flags of the consumers (alerts, recommend); the password comes from the env. */}}
{{- define "clickvec.kafkaArgs" -}}
- --brokers
- {{ .Values.kafka.brokers | quote }}
{{- with .Values.kafka.securityProtocol }}
- --security-protocol
- {{ . | quote }}
{{- end }}
{{- with .Values.kafka.sasl.mechanism }}
- --sasl-mechanism
- {{ . | quote }}
{{- end }}
{{- with .Values.kafka.sasl.username }}
- --sasl-username
- {{ . | quote }}
{{- end }}
{{- with .Values.kafka.tls.caSecret.name }}
- --ssl-cafile
- {{ include "clickvec.caPath" $ | quote }}
{{- end }}
{{- end -}}

{{- define "clickvec.caVolumeMount" -}}
{{- if .Values.kafka.tls.caSecret.name -}}
- name: kafka-ca
  mountPath: /etc/clickvec/kafka-ca
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "clickvec.caVolume" -}}
{{- with .Values.kafka.tls.caSecret.name -}}
- name: kafka-ca
  secret:
    secretName: {{ . }}
{{- end -}}
{{- end -}}

{{- define "clickvec.modelVolume" -}}
- name: model
{{ toYaml .Values.model.volume | indent 2 }}
{{- end -}}

{{- define "clickvec.kedaMax" -}}
{{- $max := .Values.keda.maxReplicas | default .Values.input.partitions | int -}}
{{- $parts := .Values.input.partitions | int -}}
{{- if gt $max $parts -}}
{{- fail (printf "keda.maxReplicas (%d) exceeds input.partitions (%d): a worker beyond the partition count gets no partition" $max $parts) -}}
{{- end -}}
{{- if lt $max (.Values.keda.minReplicas | int) -}}
{{- fail (printf "keda.minReplicas (%d) exceeds keda.maxReplicas (%d)" (.Values.keda.minReplicas | int) $max) -}}
{{- end -}}
{{- $max -}}
{{- end -}}
