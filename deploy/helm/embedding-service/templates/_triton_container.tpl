{{/*
Triton's container, the same in its own Deployment and as the gateway's sidecar. Its ports are named triton-* so that
they never clash with the gateway's in a shared pod.
*/}}
{{- define "embedding-service.tritonContainer" -}}
{{- $image := include "embedding-service.tritonImage" . | fromJson -}}
- name: triton
  image: {{ include "embedding-service.imageRef" (dict "image" $image "root" .) }}
  imagePullPolicy: {{ $image.pullPolicy }}
  {{- with .Values.triton.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - name: EMBED_MODEL_REPOSITORY
      value: {{ .Values.modelRepository.path | quote }}
    - name: EMBED_RUN_DIR
      value: /run/triton
    - name: EMBED_LOG_FORMAT
      value: {{ .Values.gateway.logFormat | quote }}
    - name: EMBED_LOG_LEVEL
      value: {{ .Values.gateway.logLevel | quote }}
    # CUDA keeps its kernel cache under $HOME; the root filesystem is read-only.
    - name: HOME
      value: /tmp
  ports:
    - name: triton-http
      containerPort: 8000
    - name: triton-grpc
      containerPort: 8001
    - name: triton-metrics
      containerPort: 8002
  # Triton's HTTP answers only once every model has loaded, and with strict readiness its ready endpoint is green only
  # while every model is.
  startupProbe:
    httpGet: {path: /v2/health/ready, port: triton-http}
    periodSeconds: {{ .Values.triton.startupProbe.periodSeconds }}
    failureThreshold: {{ .Values.triton.startupProbe.failureThreshold }}
    timeoutSeconds: 3
  readinessProbe:
    httpGet: {path: /v2/health/ready, port: triton-http}
    periodSeconds: 5
    failureThreshold: 2
    timeoutSeconds: 3
  livenessProbe:
    httpGet: {path: /v2/health/live, port: triton-http}
    periodSeconds: 10
    failureThreshold: 3
    timeoutSeconds: 3
  {{- if eq .Values.triton.mode "deployment" }}
  lifecycle:
    preStop:
      exec:
        command: [sleep, {{ .Values.triton.preStopSleepS | quote }}]
  {{- end }}
  resources:
    {{- toYaml .Values.triton.resources | nindent 4 }}
  securityContext:
    {{- include "embedding-service.securityContext" . | nindent 4 }}
  volumeMounts:
    - {name: triton-tmp, mountPath: /tmp}
    - {name: triton-run, mountPath: /run/triton}
    - {name: triton-shm, mountPath: /dev/shm}
    {{- if or .Values.modelRepository.volume (eq .Values.triton.target "gpu-tensorrt") }}
    - name: models
      mountPath: {{ .Values.modelRepository.path }}
      readOnly: true
    {{- end }}
{{- end }}

{{- define "embedding-service.tritonVolumes" -}}
- name: triton-tmp
  emptyDir: {sizeLimit: {{ .Values.triton.tmpSizeLimit }}}
- name: triton-run
  emptyDir: {sizeLimit: {{ .Values.triton.runDirSizeLimit }}}
- name: triton-shm
  emptyDir: {medium: Memory, sizeLimit: {{ .Values.triton.shmSizeLimit }}}
{{- end }}
