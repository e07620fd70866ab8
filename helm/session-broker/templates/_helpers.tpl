{{/*
Names, labels and the checks that refuse configurations the broker cannot run.
*/}}

{{- define "broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "broker.fullname" -}}
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

{{/* The Redis Deployment/Service name (in-chart Redis). */}}
{{- define "broker.redisName" -}}
{{- printf "%s-redis" (include "broker.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* Pods with this label set to "true" may reach the broker through the NetworkPolicy. */}}
{{- define "broker.clientLabel" -}}
{{- printf "%s-client" (include "broker.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; pass a dict with "ctx" (the root context) and "component". */}}
{{- define "broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "broker.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Common labels; pass a dict with "ctx" and "component". */}}
{{- define "broker.labels" -}}
helm.sh/chart: {{ include "broker.chart" .ctx }}
{{ include "broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "broker.image" -}}
{{- $variant := ternary "-local" "" (eq .Values.config.backend "local") }}
{{- printf "%s:%s" .Values.image.name (.Values.image.tag | default (printf "%s%s" .Chart.AppVersion $variant)) }}
{{- end }}

{{/*
BROKER_REDIS_URL the chart keeps in its Secret: redis.url, or empty. The
in-chart store's URL is built in the pod instead (broker.env), from the
password in its own Secret, so the password is stored once.
*/}}
{{- define "broker.redisUrl" -}}
{{- if not .Values.redis.enabled }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/*
The in-chart store's password: the value given, else the one stored in its
Secret (upgrades keep it; a new one would lock the broker out of its data),
else a new random one.
*/}}
{{- define "broker.redisPassword" -}}
{{- if .Values.redis.auth.password }}
{{- .Values.redis.auth.password }}
{{- else }}
{{- $stored := lookup "v1" "Secret" .Release.Namespace (include "broker.redisName" .) }}
{{- if and $stored $stored.data (hasKey $stored.data "redis-password") }}
{{- index $stored.data "redis-password" | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A hub token read from a Secret key (BinderHub-style secretKeyRef): used when
the backend needs it, the secrets.* value is empty and a Secret name is set.
Pass a dict with "ref" (the secretKeyRef values) and "given" (secrets.*).
Prints the secretKeyRef name when it applies, nothing otherwise.
*/}}
{{- define "broker.tokenRef" -}}
{{- if and (not .given) .ref.name .ref.key .needed }}
{{- .ref.name }}
{{- end }}
{{- end }}

{{/* The broker container's `env`: tokens from Secret keys, the in-chart store's URL, extraEnv. */}}
{{- define "broker.env" -}}
{{- $hub := include "broker.tokenRef" (dict "ref" .Values.hubApiToken.secretKeyRef "given" .Values.secrets.hub_api_token "needed" (eq .Values.config.backend "jupyterhub")) }}
{{- $binder := include "broker.tokenRef" (dict "ref" .Values.binderHubApiToken.secretKeyRef "given" .Values.secrets.binder_hub_api_token "needed" (eq .Values.config.backend "binderhub")) }}
{{- if $hub }}
- name: BROKER_HUB_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $hub }}
      key: {{ .Values.hubApiToken.secretKeyRef.key }}
{{- end }}
{{- if $binder }}
- name: BROKER_BINDER_HUB_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $binder }}
      key: {{ .Values.binderHubApiToken.secretKeyRef.key }}
{{- end }}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "broker.redisName" . }}
      key: redis-password
# Kubernetes expands $(REDIS_PASSWORD) from the variable above.
- name: BROKER_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "broker.redisName" .) | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* NetworkPolicyPeers of the ingress controller preset (networkPolicy.ingress.controller). */}}
{{- define "broker.controllerPeers" -}}
{{- $in := .Values.networkPolicy.ingress }}
{{- $ns := dict }}
{{- if $in.controllerNamespace }}
{{- $ns = dict "matchLabels" (dict "kubernetes.io/metadata.name" $in.controllerNamespace) }}
{{- end }}
{{- if has $in.controller (list "ingress-nginx" "traefik") }}
- namespaceSelector: {{ toJson $ns }}
  podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ $in.controller }}
{{- else if eq $in.controller "any-namespace" }}
- namespaceSelector: {}
{{- end }}
{{- end }}

{{/*
A value as an environment variable: lists joined with commas, whole numbers
without an exponent (YAML numbers reach templates as float64, which would
print 67108864 as 6.7108864e+07).
*/}}
{{- define "broker.envValue" -}}
{{- if kindIs "slice" . }}
{{- join "," . }}
{{- else if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
BROKER_SECRET_KEY: the value given, else the one already stored in the
release's Secret (so upgrades keep reading existing sessions), else a new
random key.
*/}}
{{- define "broker.secretKey" -}}
{{- if .Values.secrets.secret_key }}
{{- .Values.secrets.secret_key }}
{{- else }}
{{- $stored := lookup "v1" "Secret" .Release.Namespace (include "broker.fullname" .) }}
{{- if and $stored $stored.data (hasKey $stored.data "BROKER_SECRET_KEY") }}
{{- index $stored.data "BROKER_SECRET_KEY" | b64dec }}
{{- else }}
{{- randAlphaNum 64 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refuse what the broker cannot run, with a message saying what to change.
Included by the Deployment, so `helm lint`, `helm template` and
`helm install` all stop here.
*/}}
{{- define "broker.validate" -}}
{{- $c := .Values.config }}
{{- /* secrets.upstreams (BROKER_UPSTREAMS) overrides config.backend in the broker */}}
{{- $backend := ternary "federation" ($c.backend | default "local") (not (empty .Values.secrets.upstreams)) }}
{{- $hasRedis := or .Values.redis.enabled .Values.redis.url .Values.redis.urlInExistingSecret }}
{{- $scaled := or (gt (int .Values.replicas) 1) .Values.autoscaling.enabled }}
{{- if and .Values.redis.enabled .Values.redis.url }}
{{- fail "redis.enabled and redis.url are exclusive: use the in-chart Redis or your own, not both" }}
{{- end }}
{{- if and .Values.redis.urlInExistingSecret (not .Values.existingSecret) }}
{{- fail "redis.urlInExistingSecret needs existingSecret (the Secret holding BROKER_REDIS_URL)" }}
{{- end }}
{{- if and $scaled (eq $backend "local") }}
{{- fail "config.backend=local runs every session inside the broker pod, so it is single-replica only: set replicas: 1 and autoscaling.enabled: false, or use the jupyterhub or binderhub backend, or several upstreams (secrets.upstreams)" }}
{{- end }}
{{- if and $scaled (not $hasRedis) }}
{{- fail "more than one broker replica (replicas > 1 or autoscaling.enabled) needs a shared Redis: set redis.enabled: true or redis.url (each replica would otherwise keep its own sessions)" }}
{{- end }}
{{- if and (eq $backend "jupyterhub") (not $c.hub_url) }}
{{- fail "config.backend=jupyterhub needs config.hub_url (e.g. http://hub:8081 in the z2jh namespace)" }}
{{- end }}
{{- if and (eq $backend "jupyterhub") (not .Values.secrets.hub_api_token) (not .Values.existingSecret) (not .Values.hubApiToken.secretKeyRef.name) }}
{{- fail "config.backend=jupyterhub needs a JupyterHub service token: hubApiToken.secretKeyRef (z2jh's Secret hub), secrets.hub_api_token, or BROKER_HUB_API_TOKEN in existingSecret" }}
{{- end }}
{{- if and (eq $backend "binderhub") (not $c.binder_url) }}
{{- fail "config.backend=binderhub needs config.binder_url (e.g. http://binder:80 in the BinderHub namespace)" }}
{{- end }}
{{- if eq (int ($c.port | default 0)) 0 }}
{{- fail "config.port must be a fixed port in a pod (0 means any free port)" }}
{{- end }}
{{- if and (hasKey $c "shutdown_drain") (ge (float64 $c.shutdown_drain) (float64 .Values.terminationGracePeriodSeconds)) }}
{{- fail (printf "config.shutdown_drain (%v s) must stay below terminationGracePeriodSeconds (%v s), or the kubelet kills pods before open WebSockets are closed cleanly" $c.shutdown_drain .Values.terminationGracePeriodSeconds) }}
{{- end }}
{{- if and .Values.prometheusRule.enabled (not .Values.serviceMonitor.enabled) }}
{{- fail "prometheusRule.enabled needs serviceMonitor.enabled: the alert rules select the series of the ServiceMonitor's job" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is above autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/*
The NetworkPolicyPeer of the Prometheus pods (networkPolicy.prometheus):
their labels, in the given namespace or any.
*/}}
{{- define "broker.prometheusPeer" -}}
- namespaceSelector: {{ with .Values.networkPolicy.prometheus.namespace }}{{ dict "matchLabels" (dict "kubernetes.io/metadata.name" .) | toJson }}{{ else }}{}{{ end }}
  podSelector:
    matchLabels:
      {{- toYaml .Values.networkPolicy.prometheus.podLabels | nindent 6 }}
{{- end }}
