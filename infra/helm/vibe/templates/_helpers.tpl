{{/* Names and labels, as `helm create` scaffolds them. */}}
{{- define "vibe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vibe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "vibe.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "vibe.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "vibe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vibe.labels" -}}
helm.sh/chart: {{ include "vibe.chart" . }}
app.kubernetes.io/name: {{ include "vibe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "vibe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vibe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end }}

{{- define "vibe.couchdb.fullname" -}}
{{- printf "%s-couchdb" (include "vibe.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vibe.couchdb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vibe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: couchdb
{{- end }}

{{- define "vibe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The CouchDB URL vibed uses, without credentials. */}}
{{- define "vibe.couchdb.url" -}}
{{- if .Values.couchdb.enabled -}}
http://{{ include "vibe.couchdb.fullname" . }}:5984/
{{- else -}}
{{- required "couchdb.externalUrl is required when couchdb.enabled is false" .Values.couchdb.externalUrl -}}
{{- end -}}
{{- end }}

{{/* Render-time checks: a missing secret reference stops `helm install` with its name. */}}
{{- define "vibe.validate" -}}
{{- $_ := required "jwt.existingSecret is required: the Secret with the Ed25519 key every replica signs tokens with (see values.yaml)" .Values.jwt.existingSecret -}}
{{- $_ := required "couchdb.auth.existingSecret is required: the Secret with CouchDB's adminUsername, adminPassword, cookie and secret (see values.yaml)" .Values.couchdb.auth.existingSecret -}}
{{- $_ := required "s3.existingSecret is required: the Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the blob bucket (see values.yaml)" .Values.s3.existingSecret -}}
{{- $_ := required "ingress.host is required when ingress.enabled is true" (ternary .Values.ingress.host "unused" .Values.ingress.enabled) -}}
{{- if and (not .Values.ingress.enabled) (not .Values.publicUrl) -}}
{{- fail "publicUrl is required when ingress.enabled is false" -}}
{{- end -}}
{{- if lt (int .Values.replicaCount) 1 -}}
{{- fail "replicaCount must be at least 1" -}}
{{- end -}}
{{- if and .Values.couchdb.enabled (lt (int .Values.couchdb.replicas) 1) -}}
{{- fail "couchdb.replicas must be at least 1" -}}
{{- end -}}
{{- range $key := list "adminPassword" "password" "cookie" "secret" }}
{{- if hasKey $.Values.couchdb.auth $key -}}
{{- fail (printf "couchdb.auth.%s: secrets are not values; put it in the Secret named by couchdb.auth.existingSecret" $key) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{- define "vibe.publicUrl" -}}
{{- default (printf "https://%s" .Values.ingress.host) .Values.publicUrl }}
{{- end }}
