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

{{/* "true" when the replicas share one cache (PostgreSQL + S3): replicas > 1 or sharedStore.enabled. */}}
{{- define "ociregistry.sharedStore" -}}
{{- if or (gt (int .Values.replicas) 1) .Values.sharedStore.enabled }}true{{ end }}
{{- end }}

{{/* The variables holding the S3 secret key and the database URL from their Secrets. */}}
{{- define "ociregistry.s3SecretVariable" -}}OCIREGISTRY_S3_SECRET{{- end }}
{{- define "ociregistry.indexUrlVariable" -}}OCIREGISTRY_INDEX_URL{{- end }}

{{/* The configuration file: config, with serverTlsConfig from tls.* when that is on, and
index and storage from sharedStore.* when the replicas share one cache. */}}
{{- define "ociregistry.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if include "ociregistry.sharedStore" . }}
{{- with .Values.sharedStore.postgresql.url }}
{{- $_ := set $config "index" (dict "postgresql" .) }}
{{- end }}
{{- $s3 := omit .Values.sharedStore.s3 "secretKeySecret" }}
{{- $_ := set $s3 "secretKeyFromEnv" (include "ociregistry.s3SecretVariable" .) }}
{{- $_ := set $config "storage" (dict "s3" $s3) }}
{{- end }}
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
{{- if include "ociregistry.sharedStore" . }}
{{- $needs := ternary "replicas > 1 needs" "sharedStore.enabled needs" (gt (int .Values.replicas) 1) }}
{{- $postgresql := .Values.sharedStore.postgresql }}
{{- if and $postgresql.url $postgresql.urlSecret.name }}
{{- fail "sharedStore.postgresql.url and sharedStore.postgresql.urlSecret.name both name the database: set one" }}
{{- end }}
{{- if not (or $postgresql.url $postgresql.urlSecret.name) }}
{{- fail (printf "%s the shared index: set sharedStore.postgresql.urlSecret.name (a Secret whose key %q holds postgresql://USER:PASSWORD@HOST:5432/DB), or sharedStore.postgresql.url (a URL without a password)" $needs $postgresql.urlSecret.key) }}
{{- end }}
{{- $s3 := .Values.sharedStore.s3 }}
{{- range $key, $meaning := dict "endpoint" "the S3-compatible store's URL, e.g. http://rgw.internal:7480" "bucket" "the bucket holding manifests and blobs" "region" "the bucket's region, e.g. us-east-1" "accessKey" "the access key id" }}
{{- if not (get $s3 $key) }}
{{- fail (printf "%s sharedStore.s3.%s: %s" $needs $key $meaning) }}
{{- end }}
{{- end }}
{{- if not $s3.secretKeySecret.name }}
{{- fail (printf "%s sharedStore.s3.secretKeySecret.name: a Secret whose key %q holds the S3 secret access key" $needs $s3.secretKeySecret.key) }}
{{- end }}
{{- $budget := .Values.podDisruptionBudget }}
{{- if and (not $budget.minAvailable) (kindIs "invalid" $budget.maxUnavailable) }}
{{- fail "podDisruptionBudget needs maxUnavailable or minAvailable" }}
{{- end }}
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
