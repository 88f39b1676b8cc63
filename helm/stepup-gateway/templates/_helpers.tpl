{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "stepup-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name for every object of this release. */}}
{{- define "stepup-gateway.fullname" -}}
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

{{- define "stepup-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stepup-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stepup-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stepup-gateway.labels" -}}
helm.sh/chart: {{ include "stepup-gateway.chart" . }}
{{ include "stepup-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "stepup-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stepup-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Port of config.server.listen ("0.0.0.0:8080", "[::]:8080"). */}}
{{- define "stepup-gateway.port" -}}
{{- .Values.config.server.listen | toString | splitList ":" | last }}
{{- end }}

{{/* Port of config.server.metrics_listen, empty when metrics share the main port. */}}
{{- define "stepup-gateway.metricsPort" -}}
{{- $listen := index .Values.config.server "metrics_listen" | default "" | toString }}
{{- if $listen }}{{ splitList ":" $listen | last }}{{ end }}
{{- end }}

{{/* config.server.shutdown_timeout in seconds (30 when unset): an integer, "Ns" or "Nm". */}}
{{- define "stepup-gateway.shutdownSeconds" -}}
{{- $timeout := index .Values.config.server "shutdown_timeout" | default 30 | toString }}
{{- if hasSuffix "m" $timeout }}{{ mul (trimSuffix "m" $timeout | atoi) 60 }}{{ else }}{{ trimSuffix "s" $timeout | atoi }}{{ end }}
{{- end }}

{{- define "stepup-gateway.internalPrefix" -}}
{{- index .Values.config.server "internal_prefix" | default "/_gateway" }}
{{- end }}

{{- define "stepup-gateway.assertionKeyDir" -}}
/var/run/secrets/stepup-gateway
{{- end }}

{{/*
The gateway's config file: .Values.config, plus assertion.key_file pointing at the
mounted key when secrets.assertionKey.existingSecret is set.
*/}}
{{- define "stepup-gateway.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if .Values.secrets.assertionKey.existingSecret }}
{{- $keyFile := printf "%s/%s" (include "stepup-gateway.assertionKeyDir" .) .Values.secrets.assertionKey.key }}
{{- $assertion := merge (dict "key_file" $keyFile) (index $config "assertion" | default dict) }}
{{- $_ := set $config "assertion" $assertion }}
{{- end }}
{{- toYaml $config }}
{{- end }}
