{{- define "embedding-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedding-service.fullname" -}}
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

{{- define "embedding-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Names of the two workloads' objects; Triton's is also its headless Service, the DNS name the gateway resolves. */}}
{{- define "embedding-service.gatewayName" -}}
{{- printf "%s-gateway" (include "embedding-service.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedding-service.tritonName" -}}
{{- printf "%s-triton" (include "embedding-service.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedding-service.labels" -}}
helm.sh/chart: {{ include "embedding-service.chart" . }}
app.kubernetes.io/name: {{ include "embedding-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: call with (dict "root" $ "component" "gateway"). */}}
{{- define "embedding-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedding-service.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "embedding-service.componentLabels" -}}
{{ include "embedding-service.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "embedding-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embedding-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag][@digest] from an image map; call with (dict "image" .Values.image "root" $). */}}
{{- define "embedding-service.imageRef" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* Triton's image: its own when given, else the gateway's (the CPU profile runs both from one image). */}}
{{- define "embedding-service.tritonImage" -}}
{{- if .Values.triton.image }}
{{- merge (deepCopy .Values.triton.image) (dict "tag" "" "digest" "" "pullPolicy" .Values.image.pullPolicy) | toJson }}
{{- else }}
{{- .Values.image | toJson }}
{{- end }}
{{- end }}

{{/* Where the gateway calls Triton: every ready Triton pod behind the headless Service, or the sidecar. */}}
{{- define "embedding-service.tritonUrl" -}}
{{- if eq .Values.triton.mode "sidecar" }}
{{- print "127.0.0.1:8001" }}
{{- else }}
{{- printf "%s.%s.svc.%s:8001" (include "embedding-service.tritonName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}
{{- end }}

{{/* Values that cannot work together stop the rendering with the reason. */}}
{{- define "embedding-service.validate" -}}
{{- if not (has .Values.triton.mode (list "deployment" "sidecar")) }}
{{- fail (printf "triton.mode must be deployment or sidecar, not %q" .Values.triton.mode) }}
{{- end }}
{{- if not (has .Values.triton.target (list "cpu" "gpu-onnxruntime" "gpu-tensorrt")) }}
{{- fail (printf "triton.target must be cpu, gpu-onnxruntime or gpu-tensorrt, not %q" .Values.triton.target) }}
{{- end }}
{{- if and (not .Values.auth.enabled) (not .Values.auth.allowUnauthenticated) }}
{{- fail "auth.enabled is off: the gateway listens on the pod's network and would serve anyone. Turn auth on (auth.existingSecret with a postgresql:// URL), or set auth.allowUnauthenticated=true only when something in front of the gateway authenticates callers." }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.databaseUrl) }}
{{- fail "auth.enabled needs the token store every replica shares: auth.existingSecret (a Secret holding a postgresql:// URL under auth.databaseUrlKey) or auth.databaseUrl." }}
{{- end }}
{{- if and .Values.cache.enabled (not .Values.cache.existingSecret) (not .Values.cache.url) }}
{{- fail "cache.enabled needs the Redis URL: cache.existingSecret (a Secret holding a redis:// URL under cache.urlKey) or cache.url." }}
{{- end }}
{{- if and (include "embedding-service.serviceMonitors" .) .Values.auth.metricsAuth (not .Values.serviceMonitor.gatewayTokenSecret) }}
{{- fail "auth.metricsAuth puts /metrics behind a token: give the scrape one in serviceMonitor.gatewayTokenSecret ({name, key})" }}
{{- end }}
{{- if and (eq .Values.triton.mode "sidecar") (eq .Values.triton.target "gpu-tensorrt") }}
{{- fail "triton.target gpu-tensorrt builds its plans in Triton's own pods: use triton.mode=deployment" }}
{{- end }}
{{- if and .Values.modelRepository.fromTritonImage (eq .Values.triton.target "cpu") }}
{{- fail "modelRepository.fromTritonImage copies a GPU export from the Triton image; the cpu target serves the gateway's own" }}
{{- end }}
{{- if not (has (toString .Values.serviceMonitor.enabled) (list "auto" "true" "false")) }}
{{- fail (printf "serviceMonitor.enabled must be auto, true or false, not %q" (toString .Values.serviceMonitor.enabled)) }}
{{- end }}
{{- range $component := include "embedding-service.workloads" . | fromJsonArray }}
{{- $budget := index $.Values $component "pdb" "maxUnavailable" }}
{{- $replicas := include "embedding-service.minReplicas" (dict "root" $ "component" $component) | int }}
{{- if and (gt $replicas 1) (not (kindIs "string" $budget)) (or (lt (int $budget) 1) (ge (int $budget) $replicas)) }}
{{- fail (printf "%s.pdb.maxUnavailable is %v with %d replicas at the fewest: it must be at least 1 (0 blocks every node drain) and less than %d (else one drain may evict them all)" $component $budget $replicas $replicas) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Whether the chart makes its ServiceMonitors ("true" or empty). auto: only where the cluster serves the Prometheus
Operator's API, which helm install and upgrade ask the cluster (helm template knows it from --api-versions), so that
a cluster without the operator installs the rest; true makes them whatever Helm sees, for helm template without
--api-versions.
*/}}
{{- define "embedding-service.serviceMonitors" -}}
{{- $enabled := toString .Values.serviceMonitor.enabled }}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{ end }}
{{- end }}

{{/* The components that run as Deployments of their own, as a JSON list: Triton only outside sidecar mode. */}}
{{- define "embedding-service.workloads" -}}
{{- ternary (list "gateway" "triton") (list "gateway") (eq .Values.triton.mode "deployment") | toJson }}
{{- end }}

{{/*
The fewest replicas a workload runs, which its disruption budget must fit: the autoscaler's minimum, or the fixed
count without autoscaling; call with (dict "root" $ "component" "gateway").
*/}}
{{- define "embedding-service.minReplicas" -}}
{{- $values := index .root.Values .component }}
{{- if .root.Values.autoscaling.enabled }}
{{- $values.autoscaling.minReplicas }}
{{- else }}
{{- $values.replicas }}
{{- end }}
{{- end }}

{{/* The Secret the chart makes for URLs given inline (auth.databaseUrl, cache.url). */}}
{{- define "embedding-service.secretName" -}}
{{- printf "%s-credentials" (include "embedding-service.fullname" .) }}
{{- end }}

{{- define "embedding-service.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "embedding-service.securityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

{{/* Spreads a component's pods over nodes when it can: one node going down takes one replica, not all. */}}
{{- define "embedding-service.antiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "embedding-service.selectorLabels" . | nindent 12 }}
{{- end }}

{{/* The model repository volume of a pod, when it is not the image's own. */}}
{{- define "embedding-service.modelsVolume" -}}
{{- if .Values.modelRepository.volume }}
- name: models
  {{- toYaml .Values.modelRepository.volume | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The Prometheus adapter rules behind the per-pod metrics the HPAs name (custom.metrics.k8s.io). Series come from the
ServiceMonitors, whose targets carry namespace and pod labels.
*/}}
{{- define "embedding-service.adapterRules" -}}
rules:
  - seriesQuery: 'embed_gateway_pending_texts{namespace!="",pod!=""}'
    resources:
      overrides:
        namespace: {resource: namespace}
        pod: {resource: pod}
    name:
      matches: ^embed_gateway_pending_texts$
      as: embed_gateway_pending_texts
    # Averaged over a minute: the gauge is read at each scrape and swings with every request.
    metricsQuery: sum(avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)
  - seriesQuery: 'embed_gateway_rejections_total{namespace!="",pod!="",reason="overloaded"}'
    resources:
      overrides:
        namespace: {resource: namespace}
        pod: {resource: pod}
    name:
      matches: ^embed_gateway_rejections_total$
      as: embed_gateway_overloaded_per_second
    metricsQuery: sum(rate(<<.Series>>{<<.LabelMatchers>>,reason="overloaded"}[2m])) by (<<.GroupBy>>)
  - seriesQuery: 'nv_inference_queue_duration_us{namespace!="",pod!=""}'
    resources:
      overrides:
        namespace: {resource: namespace}
        pod: {resource: pod}
    name:
      matches: ^nv_inference_queue_duration_us$
      as: triton_queue_seconds_per_request
    # Per model, the queue time of the requests it took over two minutes; the busiest model stands for the pod (an
    # ensemble's requests queue in its steps). A model that took no request counts 0, not NaN.
    metricsQuery: >-
      max by (<<.GroupBy>>) (
        rate(<<.Series>>{<<.LabelMatchers>>}[2m]) / 1e6
        / clamp_min(rate(nv_inference_request_success{<<.LabelMatchers>>}[2m]), 1e-9)
      )
{{- end }}

{{/*
checkov's skip annotations (checkov.io/skipN: CHECK=reason) for the checks a workload fails on purpose; call with
(dict "images" <the pod's image maps> "secretEnv" <whether Secrets reach it as variables>).
*/}}
{{- define "embedding-service.checkovSkips" -}}
{{- $n := 0 }}
{{- $undigested := list }}
{{- range .images }}{{ if not .digest }}{{ $undigested = append $undigested .repository }}{{ end }}{{ end }}
{{- if $undigested }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: CKV_K8S_43=pinned by release tag, not digest ({{ $undigested | uniq | join ", " }}); set the image digest values to pin the exact build
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: CKV_K8S_15=release tags are immutable (never pushed again), so IfNotPresent cannot run a stale image; a digest passes this check
{{- end }}
{{- if .secretEnv }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: CKV_K8S_35=the gateway reads its settings only from EMBED_* variables; the URLs come from the Secret by secretKeyRef
{{- end }}
{{- end }}
