{{/* The chart's name, and the name of the release's objects. */}}
{{- define "ociregistry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ociregistry.fullname" -}}
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

{{- define "ociregistry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ociregistry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ociregistry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ociregistry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Where the TLS Secret is mounted. */}}
{{- define "ociregistry.tlsDir" -}}/etc/ociregistry/tls{{- end }}

{{/* The configuration file: config, with serverTlsConfig from tls.* when that is on. */}}
{{- define "ociregistry.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if .Values.tls.enabled }}
{{- $dir := include "ociregistry.tlsDir" . }}
{{- $tls := dict "cert" (printf "%s/tls.crt" $dir) "key" (printf "%s/tls.key" $dir) "clientAuth" .Values.tls.clientAuth }}
{{- if eq .Values.tls.clientAuth "verify" }}
{{- $_ := set $tls "ca" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- $_ := set $config "serverTlsConfig" $tls }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Checks of values that would make a server that cannot work. */}}
{{- define "ociregistry.validate" -}}
{{- if gt (int .Values.replicas) 1 }}
{{- fail "replicas > 1 needs a store shared by the replicas (PostgreSQL + S3), which this chart does not support yet: set replicas: 1" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret (tls.crt, tls.key, and ca.crt for clientAuth verify)" }}
{{- end }}
{{- if not (has .Values.tls.clientAuth (list "none" "verify")) }}
{{- fail "tls.clientAuth is none or verify" }}
{{- end }}
{{- if and .Values.tls.enabled (eq .Values.tls.clientAuth "verify") (not .Values.config.health) }}
{{- fail "with tls.clientAuth verify the kubelet's probes carry no client certificate: set config.health to a port for a plain /health listener (e.g. 8082)" }}
{{- end }}
{{- if not (has .Values.service.type (list "ClusterIP" "NodePort")) }}
{{- fail "service.type is ClusterIP or NodePort" }}
{{- end }}
{{- if and .Values.service.nodePort (ne .Values.service.type "NodePort") }}
{{- fail "service.nodePort needs service.type NodePort" }}
{{- end }}
{{- end }}
