"""Static checks of the deployment under deploy/, offline: the Helm chart rendered and linted by Helm's own library for
each profile and mode, every object validated against the Kubernetes schemas, the manifests and both Dockerfiles
scanned by checkov, and what the chart promises asserted on the rendered objects.

The tools run from .venv-checks, which `bin/setup --checks` (run by bin/test) installs from deploy/requirements-checks.lock.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
CHECKS_BIN = ROOT / ".venv-checks" / "bin"
CHART = ROOT / "deploy" / "helm" / "embedding-service"
IMAGES = ROOT / "deploy" / "images"
RELEASE = NAMESPACE = "embedding"
GATEWAY = f"{RELEASE}-embedding-service-gateway"
TRITON = f"{RELEASE}-embedding-service-triton"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# kubernetes-validate has schemas for Kubernetes' own kinds only; the Prometheus Operator's ServiceMonitor is checked
# by test_service_monitors_scrape_existing_service_ports instead.
CRD_KINDS = {"ServiceMonitor"}
# Image pinned by tag rather than digest (43) and so pulled IfNotPresent (15); URLs read from Secrets as variables (35).
ACCEPTED_SKIPS = {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_35"}
INLINE_SECRETS = {
    "auth": {"existingSecret": "", "databaseUrl": "postgresql://embed:secret@postgres/embed"},
    "cache": {"enabled": True, "url": "redis://cache:6379/0"},
}
# A cluster with the Prometheus Operator, as helm install finds it there; without it, a cluster with Kubernetes' own
# APIs alone.
OPERATOR = ["--api-versions", "monitoring.coreos.com/v1"]
PROFILES = {
    "default": OPERATOR,
    "cpu": [*OPERATOR, "-f", str(CHART / "values-cpu.yaml")],
    "gpu": [*OPERATOR, "-f", str(CHART / "values-gpu.yaml")],
    "sidecar": [*OPERATOR, "--set-json", json.dumps({"triton": {"mode": "sidecar"}})],
    "gpu-tensorrt": [
        *OPERATOR,
        "-f",
        str(CHART / "values-gpu.yaml"),
        "--set-json",
        json.dumps({"triton": {"target": "gpu-tensorrt"}}),
    ],
    "inline-secrets": [*OPERATOR, "--set-json", json.dumps(INLINE_SECRETS)],
    "gpu-plain-cluster": ["-f", str(CHART / "values-gpu.yaml")],
}
WITHOUT_AUTOSCALING = {"autoscaling": {"enabled": False}}


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(CHECKS_BIN / "python"),
            str(ROOT / "deploy" / "render_chart.py"),
            "--lint",
            "--release",
            RELEASE,
            "--namespace",
            NAMESPACE,
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    assert (CHECKS_BIN / "python").exists(), "the deployment check tools are missing: run bin/setup --checks"
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for profile, args in PROFILES.items():
        result = render(*args)
        assert result.returncode == 0, f"{profile}: {result.stderr}"
        files[profile] = out / f"{profile}.yaml"
        files[profile].write_text(result.stdout)
    return files


@pytest.fixture(scope="module")
def objects(manifests) -> dict[str, list[dict]]:
    return {profile: [o for o in yaml.safe_load_all(path.read_text()) if o] for profile, path in manifests.items()}


def find(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def kinds(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def container(pod_spec: dict, name: str) -> dict:
    (found,) = [c for c in pod_spec.get("initContainers", []) + pod_spec["containers"] if c["name"] == name]
    return found


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def pod_specs(objects: list[dict]) -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in kinds(objects, "Deployment")]


def rendered(*args: str) -> list[dict]:
    result = render(*args)
    assert result.returncode == 0, result.stderr
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def fewest_replicas(objects: list[dict], deployment: dict) -> int:
    """The replicas a Deployment runs at the fewest: its autoscaler's minimum, or its fixed count."""
    name = deployment["metadata"]["name"]
    scalers = [h for h in kinds(objects, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
    return scalers[0]["spec"]["minReplicas"] if scalers else deployment["spec"]["replicas"]


def budgets_of(objects: list[dict], deployment: dict) -> list[dict]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return [b for b in kinds(objects, "PodDisruptionBudget") if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]


def json_values(text: str) -> list[dict]:
    """checkov's JSON output: one report or a list of them per directory scanned, one after the other."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(text.rstrip()):
        value, at = decoder.raw_decode(text, at)
        values += value if isinstance(value, list) else [value]
        at += len(text[at:]) - len(text[at:].lstrip())
    return values


def test_every_object_matches_the_kubernetes_schemas(manifests):
    result = subprocess.run(
        [
            str(CHECKS_BIN / "kubernetes-validate"),
            "--strict",
            "--quiet",
            *[a for v in KUBERNETES_VERSIONS for a in ("-k", v)],
            *map(str, manifests.values()),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    unknown = [line for line in result.stdout.splitlines() if not any(f"kind {k} " in line for k in CRD_KINDS)]
    assert not unknown, unknown


def test_checkov_finds_nothing_in_manifests_and_dockerfiles(manifests, tmp_path):
    # Offline: no update check against PyPI, no download of the platform's guidelines, no credentials to upload with.
    offline = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
        "BC_SKIP_MAPPING": "TRUE",
    }
    result = subprocess.run(
        [
            str(CHECKS_BIN / "checkov"),
            "--skip-download",
            "-o",
            "json",
            "--framework",
            "kubernetes",
            "dockerfile",
            "-d",
            str(next(iter(manifests.values())).parent),
            "-d",
            str(IMAGES),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=offline,
    )
    by_type = {r["check_type"]: r for r in json_values(result.stdout)}
    assert set(by_type) == {"kubernetes", "dockerfile"}, result.stdout[:2000] + result.stderr[-2000:]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} in {c['file_path']}"
        for r in by_type.values()
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert all(r["summary"]["parsing_errors"] == 0 for r in by_type.values())
    scanned = {c["file_path"].lstrip("/") for c in by_type["dockerfile"]["results"]["passed_checks"]}
    assert scanned == {"cpu.Dockerfile", "gpu.Dockerfile"}
    assert {f"{p}.yaml" for p in PROFILES} <= {
        c["file_path"].lstrip("/") for c in by_type["kubernetes"]["results"]["passed_checks"]
    }
    # The checks the chart skips on purpose (its checkovSkips helper says why), and no others.
    skipped = [c for r in by_type.values() for c in r["results"]["skipped_checks"]]
    assert {c["check_id"] for c in skipped} <= ACCEPTED_SKIPS
    assert all(len(c["check_result"]["suppress_comment"]) > 20 for c in skipped)


def test_gateway_probes_its_health_routes(objects):
    for profile in PROFILES:
        gateway = container(find(objects[profile], "Deployment", GATEWAY)["spec"]["template"]["spec"], "gateway")
        ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
        assert ports == {"http": 8080, "grpc": 50051}
        assert gateway["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
        assert gateway["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
        assert gateway["startupProbe"]["httpGet"]["path"] == "/health/live"


def test_triton_probes_its_own_health_and_waits_for_its_models(objects):
    for profile in PROFILES:
        triton = container(pod_specs(objects[profile])[-1], "triton")
        assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {
            "triton-http": 8000,
            "triton-grpc": 8001,
            "triton-metrics": 8002,
        }
        assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "triton-http"}
        assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "triton-http"}
        startup = triton["startupProbe"]
        assert startup["httpGet"]["path"] == "/v2/health/ready"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading gets ten minutes at least"


def test_gateway_finds_every_triton_through_the_headless_service(objects):
    for profile in ("default", "cpu", "gpu", "gpu-tensorrt"):
        service = find(objects[profile], "Service", TRITON)
        assert service["spec"]["clusterIP"] == "None"
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 8001, "metrics": 8002}
        triton_pod = find(objects[profile], "Deployment", TRITON)["spec"]["template"]
        assert service["spec"]["selector"].items() <= triton_pod["metadata"]["labels"].items()
        gateway = container(find(objects[profile], "Deployment", GATEWAY)["spec"]["template"]["spec"], "gateway")
        assert env(gateway)["EMBED_TRITON_URL"] == f"{TRITON}.{NAMESPACE}.svc.cluster.local:8001"
        assert float(env(gateway)["EMBED_TRITON_DNS_REFRESH_S"]) > 0


def test_sidecar_mode_puts_triton_in_each_gateway_pod(objects):
    sidecar = objects["sidecar"]
    assert [d["metadata"]["name"] for d in kinds(sidecar, "Deployment")] == [GATEWAY]
    assert [h["metadata"]["name"] for h in kinds(sidecar, "HorizontalPodAutoscaler")] == [GATEWAY]
    pod = find(sidecar, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    # A native sidecar: started (and probed ready) before the gateway, stopped after it.
    assert [(c["name"], c.get("restartPolicy")) for c in pod["initContainers"]] == [("triton", "Always")]
    assert [c["name"] for c in pod["containers"]] == ["gateway"]
    assert env(container(pod, "gateway"))["EMBED_TRITON_URL"] == "127.0.0.1:8001"
    gateway_hpa = find(sidecar, "HorizontalPodAutoscaler", GATEWAY)
    assert "triton_queue_seconds_per_request" in {
        m["pods"]["metric"]["name"] for m in gateway_hpa["spec"]["metrics"] if m["type"] == "Pods"
    }


def test_autoscalers_scale_on_served_load_metrics_and_cpu(objects):
    exported = Metrics().render(None)[0].decode()
    for profile in PROFILES:
        rules_map = find(objects[profile], "ConfigMap", f"{RELEASE}-embedding-service-prometheus-adapter-rules")
        rules = yaml.safe_load(rules_map["data"]["config.yaml"])["rules"]
        served = {r["name"]["as"] for r in rules}
        deployments = {d["metadata"]["name"] for d in kinds(objects[profile], "Deployment")}
        for hpa in kinds(objects[profile], "HorizontalPodAutoscaler"):
            spec = hpa["spec"]
            assert spec["scaleTargetRef"]["name"] in deployments
            pods_metrics = {m["pods"]["metric"]["name"] for m in spec["metrics"] if m["type"] == "Pods"}
            assert pods_metrics and pods_metrics <= served, f"{profile}: the adapter serves {served}, not all of {pods_metrics}"
            assert {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": spec["metrics"][-1]["resource"]["target"]["averageUtilization"],
                    },
                },
            } in spec["metrics"]
        gateway_metrics = {
            m["pods"]["metric"]["name"]
            for m in find(objects[profile], "HorizontalPodAutoscaler", GATEWAY)["spec"]["metrics"]
            if m["type"] == "Pods"
        }
        assert {"embed_gateway_pending_texts", "embed_gateway_overloaded_per_second"} <= gateway_metrics
        if profile != "sidecar":
            triton_hpa = find(objects[profile], "HorizontalPodAutoscaler", TRITON)
            assert {m["pods"]["metric"]["name"] for m in triton_hpa["spec"]["metrics"] if m["type"] == "Pods"} == {
                "triton_queue_seconds_per_request"
            }
        # The adapter's gateway series are ones the gateway exports.
        for rule in rules:
            series = re.match(r"(\w+)", rule["seriesQuery"]).group(1)
            if series.startswith("embed_gateway_"):
                assert re.search(rf"^{series}[{{ ]", exported, re.MULTILINE), f"the gateway exports no {series}"
    assert 'embed_gateway_rejections_total{reason="overloaded"}' in exported


def test_chart_refuses_a_gateway_open_to_anyone():
    refused = render("--set-json", json.dumps({"auth": {"enabled": False}}))
    assert refused.returncode != 0 and "allowUnauthenticated" in refused.stderr
    no_store = render("--set-json", json.dumps({"auth": {"existingSecret": ""}}))
    assert no_store.returncode != 0 and "postgresql://" in no_store.stderr
    opened = render("--set-json", json.dumps({"auth": {"enabled": False, "allowUnauthenticated": True}}))
    assert opened.returncode == 0, opened.stderr
    gateway = container(
        find(list(yaml.safe_load_all(opened.stdout)), "Deployment", GATEWAY)["spec"]["template"]["spec"], "gateway"
    )
    assert env(gateway)["EMBED_AUTH"] == "0" and env(gateway)["EMBED_ALLOW_UNAUTHENTICATED"] == "1"
    assert "EMBED_AUTH_DATABASE" not in env(gateway)


def test_credentials_come_from_secrets(objects):
    default = container(find(objects["default"], "Deployment", GATEWAY)["spec"]["template"]["spec"], "gateway")
    assert env(default)["EMBED_AUTH"] == "1" and env(default)["EMBED_HOST"] == "0.0.0.0"
    assert env(default)["EMBED_AUTH_DATABASE"] == {"secretKeyRef": {"name": "embedding-auth", "key": "database-url"}}
    assert not kinds(objects["default"], "Secret") and "EMBED_CACHE_URL" not in env(default)

    inline = objects["inline-secrets"]
    (secret,) = kinds(inline, "Secret")
    assert secret["stringData"] == {
        "database-url": INLINE_SECRETS["auth"]["databaseUrl"],
        "cache-url": INLINE_SECRETS["cache"]["url"],
    }
    gateway = env(container(find(inline, "Deployment", GATEWAY)["spec"]["template"]["spec"], "gateway"))
    assert gateway["EMBED_AUTH_DATABASE"] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "database-url"}}
    assert gateway["EMBED_CACHE_URL"] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "cache-url"}}
    assert (gateway["EMBED_CACHE_TTL_S"], gateway["EMBED_CACHE_MAX_BYTES"]) == ("86400", "1073741824")
    for profile in PROFILES:
        for config_map in kinds(objects[profile], "ConfigMap"):
            assert not re.search(r"(postgresql|redis)://", json.dumps(config_map)), "a URL with credentials in a ConfigMap"


def test_pods_run_unprivileged_with_bounded_resources(objects):
    for profile in PROFILES:
        for pod in pod_specs(objects[profile]):
            assert pod["automountServiceAccountToken"] is False
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            mounted = {v["name"] for v in pod["volumes"]}
            for c in pod.get("initContainers", []) + pod["containers"]:
                context = c["securityContext"]
                assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
                assert context["capabilities"]["drop"] == ["ALL"] and context["runAsNonRoot"] is True
                assert {"cpu", "memory"} <= c["resources"]["requests"].keys() & c["resources"]["limits"].keys()
                assert {m["name"] for m in c.get("volumeMounts", [])} <= mounted
            for c in [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] in ("gateway", "triton")]:
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
        (account,) = kinds(objects[profile], "ServiceAccount")
        assert account["automountServiceAccountToken"] is False


def test_each_workload_spreads_over_nodes(objects):
    for profile in PROFILES:
        for deployment in kinds(objects[profile], "Deployment"):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
                "preferredDuringSchedulingIgnoredDuringExecution"
            ]
            assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
            assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


def test_disruption_budgets_let_drains_through_one_pod_at_a_time(objects):
    """A workload of two replicas or more has one budget that evicts at most one pod at once; a single replica has
    none, as any budget would either change nothing or block every drain of its node."""
    fixed = {
        replicas: rendered(
            *PROFILES["default"],
            "--set-json",
            json.dumps({**WITHOUT_AUTOSCALING, "gateway": {"replicas": replicas}, "triton": {"replicas": replicas}}),
        )
        for replicas in (1, 3)
    }
    cases = {**objects, "fixed-1": fixed[1], "fixed-3": fixed[3]}
    for case, found in cases.items():
        for deployment in kinds(found, "Deployment"):
            budgets = budgets_of(found, deployment)
            replicas = fewest_replicas(found, deployment)
            if replicas == 1:
                assert not budgets, f"{case}: a budget for the single replica of {deployment['metadata']['name']}"
            else:
                (budget,) = budgets
                assert budget["spec"] == {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}, case
    assert not kinds(fixed[1], "PodDisruptionBudget")
    assert len(kinds(fixed[3], "PodDisruptionBudget")) == 2
    # The GPU profile's one Triton pod has no budget, its two gateways have theirs.
    gpu_budgets = {b["metadata"]["name"] for b in kinds(objects["gpu"], "PodDisruptionBudget")}
    assert gpu_budgets == {GATEWAY}
    assert {b["metadata"]["name"] for b in kinds(objects["default"], "PodDisruptionBudget")} == {GATEWAY, TRITON}


def test_chart_refuses_a_budget_that_blocks_drains_or_allows_every_eviction():
    for budget, replicas in ((0, 3), (3, 3), (2, 2)):
        values = {**WITHOUT_AUTOSCALING, "triton": {"replicas": replicas, "pdb": {"maxUnavailable": budget}}}
        refused = render("--set-json", json.dumps(values))
        assert refused.returncode != 0, f"maxUnavailable {budget} of {replicas} replicas rendered"
        assert f"triton.pdb.maxUnavailable is {budget} with {replicas} replicas" in refused.stderr
    percentage = rendered("--set-json", json.dumps({"gateway": {"pdb": {"maxUnavailable": "25%"}}}))
    assert find(percentage, "PodDisruptionBudget", GATEWAY)["spec"]["maxUnavailable"] == "25%"


def test_triton_takes_calls_from_the_gateway_only(objects):
    policy = find(objects["default"], "NetworkPolicy", TRITON)
    grpc_rule, metrics_rule = policy["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "triton-grpc"}]
    gateway_labels = find(objects["default"], "Deployment", GATEWAY)["spec"]["template"]["metadata"]["labels"]
    assert [p["podSelector"]["matchLabels"] for p in grpc_rule["from"]] == [gateway_labels]
    assert metrics_rule["ports"] == [{"port": "triton-metrics"}]
    sidecar_policy = find(objects["sidecar"], "NetworkPolicy", GATEWAY)
    assert {p["port"] for rule in sidecar_policy["spec"]["ingress"] for p in rule["ports"]} == {"http", "grpc", "triton-metrics"}


def test_gpu_profile_gives_triton_a_gpu_and_the_gateway_its_export(objects):
    for profile in ("gpu", "gpu-tensorrt"):
        pod = find(objects[profile], "Deployment", TRITON)["spec"]["template"]["spec"]
        triton = container(pod, "triton")
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert triton["args"] == ["python", "-m", "deploy.images.run_triton"], "Triton under the stub supervisor"
        gateway_pod = find(objects[profile], "Deployment", GATEWAY)["spec"]["template"]["spec"]
        copy = container(gateway_pod, "copy-model-repository")
        assert copy["image"] == triton["image"] and "--exclude='*.onnx'" in copy["command"][-1]
        assert "nvidia.com/gpu" not in container(gateway_pod, "gateway")["resources"]["limits"]
    cpu_triton = container(find(objects["cpu"], "Deployment", TRITON)["spec"]["template"]["spec"], "triton")
    assert cpu_triton["args"] == ["python", "-m", "deploy.images.run_triton"]
    assert (IMAGES / "run_triton.py").exists()

    pod = find(objects["gpu-tensorrt"], "Deployment", TRITON)["spec"]["template"]["spec"]
    copy, build = pod["initContainers"]
    assert copy["image"] == container(pod, "triton")["image"] and "/opt/deploy/build_tensorrt_plans.py" in copy["command"][-1]
    assert build["image"].startswith("nvcr.io/nvidia/tensorrt:24.10-py3") and build["resources"]["limits"]["nvidia.com/gpu"] == 1
    models = {m["name"]: m["mountPath"] for m in container(pod, "triton")["volumeMounts"]}
    assert models["models"] == "/models" and "emptyDir" in {v["name"]: v for v in pod["volumes"]}["models"]
    assert (
        "COPY deploy/images/build_tensorrt_plans.py /opt/deploy/build_tensorrt_plans.py"
        in (IMAGES / "gpu.Dockerfile").read_text()
    )


def test_gpu_triton_schedules_on_any_gpu_node_without_discovery_labels(objects):
    """The GPU request alone places the pod: no node label is required, which a cluster without the GPU Operator or
    GPU feature discovery lacks, and the usual GPU taint is tolerated; a label selector is the user's choice."""
    for profile in ("gpu", "gpu-tensorrt", "gpu-plain-cluster"):
        pod = find(objects[profile], "Deployment", TRITON)["spec"]["template"]["spec"]
        assert "nodeSelector" not in pod, f"{profile}: {pod.get('nodeSelector')}"
        assert "nodeAffinity" not in pod["affinity"]
        assert container(pod, "triton")["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    chosen = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    selected = rendered(*PROFILES["gpu"], "--set-json", json.dumps({"triton": {"nodeSelector": chosen}}))
    assert find(selected, "Deployment", TRITON)["spec"]["template"]["spec"]["nodeSelector"] == chosen


def test_gpu_image_runs_triton_under_the_stub_supervisor():
    text = (IMAGES / "gpu.Dockerfile").read_text()
    final_stage = text[text.rindex("\nFROM ") :]
    assert "COPY deploy/images/run_triton.py deploy/images/run_triton.py" in final_stage
    assert {"COPY gateway gateway", "COPY repository_contract repository_contract"} <= set(final_stage.splitlines())
    # tini reaps the stubs a dying tritonserver leaves behind; NVIDIA's entrypoint still runs before the supervisor.
    assert re.search(r'^ENTRYPOINT \["tini", "--", "/opt/nvidia/nvidia_entrypoint.sh"\]$', final_stage, re.MULTILINE)
    assert re.search(r'^CMD \["python", "-m", "deploy.images.run_triton"\]$', final_stage, re.MULTILINE)


def test_gpu_image_runs_nvidias_tritonserver_with_the_supervisors_flags(tmp_path):
    """The script the GPU image writes over the wheel's tritonserver: NVIDIA's server gets every flag TritonProcess
    passes but the wheel's backend and cache folders, so it loads its own onnxruntime and TensorRT backends."""
    text = (IMAGES / "gpu.Dockerfile").read_text()
    (printf,) = re.findall(
        r"^RUN (printf .*?) \\\n +> /opt/venv/\S+/pytriton/tritonserver/bin/tritonserver$", text, re.MULTILINE | re.DOTALL
    )
    script = subprocess.run(["sh", "-c", printf.replace("\\\n", "")], check=True, capture_output=True, text=True).stdout
    assert "exec /opt/tritonserver/bin/tritonserver " in script
    calls = tmp_path / "calls"
    server = tmp_path / "tritonserver"
    server.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\n')
    server.chmod(server.stat().st_mode | stat.S_IXUSR)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(script.replace("/opt/tritonserver/bin/tritonserver", str(server)))
    flags = [
        "--model-repository=/models",
        "--load-model=all-minilm-l6-v2",
        "--backend-directory=/run/triton/backends",
        "--cache-directory=/opt/venv/pytriton/tritonserver/caches",
        "--http-restricted-api=model-repository,trace:admin-key=a key",
        "--exit-timeout-secs=5",
    ]
    subprocess.run(["sh", str(wrapper), *flags], check=True)
    assert calls.read_text().splitlines() == [f for f in flags if not f.startswith(("--backend-directory", "--cache-directory"))]


def test_service_monitors_only_where_the_prometheus_operator_api_is_served(objects):
    """auto (the default) makes them where the cluster serves monitoring.coreos.com/v1 and leaves them out elsewhere,
    so that the chart installs on a cluster without the operator; true and false decide alone."""
    assert len(kinds(objects["gpu"], "ServiceMonitor")) == 2
    assert not kinds(objects["gpu-plain-cluster"], "ServiceMonitor")
    assert len(kinds(rendered("--set-json", json.dumps({"serviceMonitor": {"enabled": True}})), "ServiceMonitor")) == 2
    off = rendered(*OPERATOR, "--set-json", json.dumps({"serviceMonitor": {"enabled": False}}))
    assert not kinds(off, "ServiceMonitor")
    refused = render("--set-json", json.dumps({"serviceMonitor": {"enabled": "yes"}}))
    assert refused.returncode != 0 and "serviceMonitor.enabled must be auto, true or false" in refused.stderr
    # A token for a scrape that is not made is not asked for.
    metrics_auth = {"auth": {"metricsAuth": True}}
    assert render("--set-json", json.dumps(metrics_auth)).returncode == 0
    needs_token = render(*OPERATOR, "--set-json", json.dumps(metrics_auth))
    assert needs_token.returncode != 0 and "serviceMonitor.gatewayTokenSecret" in needs_token.stderr


def test_service_monitors_scrape_existing_service_ports(objects):
    for profile in [p for p in PROFILES if p != "gpu-plain-cluster"]:
        services = kinds(objects[profile], "Service")
        monitors = kinds(objects[profile], "ServiceMonitor")
        assert len(monitors) == 2
        for monitor in monitors:
            assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
            selector = monitor["spec"]["selector"]["matchLabels"]
            (service,) = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["path"] == "/metrics"
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_images_run_as_the_user_the_chart_expects():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    user = f"{values['securityContext']['runAsUser']}:{values['securityContext']['runAsGroup']}"
    for dockerfile, ports in (
        ("cpu.Dockerfile", {"8080", "50051", "8000", "8001", "8002"}),
        ("gpu.Dockerfile", {"8000", "8001", "8002"}),
    ):
        text = (IMAGES / dockerfile).read_text()
        final_stage = text[text.rindex("\nFROM ") :]
        assert re.findall(r"^USER (\S+)$", final_stage, re.MULTILINE) == [user], dockerfile
        assert set(re.search(r"^EXPOSE (.+)$", final_stage, re.MULTILINE).group(1).split()) == ports, dockerfile
        assert re.search(r"^HEALTHCHECK ", final_stage, re.MULTILINE), dockerfile


def test_tensorrt_plans_are_built_with_a_profile_per_encoder_input(tmp_path):
    repository = tmp_path / "models"
    manifest = {
        "name": "m",
        "target": "gpu-tensorrt",
        "precision": "fp16",
        "max_batch_size": 32,
        "max_sequence_length": 512,
        "steps": {"encoder": "m-encoder", "controlled-encoder": "m-controlled-encoder"},
    }
    (repository / "m").mkdir(parents=True)
    (repository / "m" / "embedding_manifest.json").write_text(json.dumps(manifest))
    for step, extra in (
        ("m-encoder", ""),
        ("m-controlled-encoder", ',\n  { name: "control_log_additive" data_type: TYPE_BOOL dims: [1] }'),
    ):
        (repository / step / "1").mkdir(parents=True)
        (repository / step / "1" / "model.onnx.for-trtexec").write_bytes(b"onnx")
        (repository / step / "config.pbtxt").write_text(
            f'name: "{step}"\nplatform: "tensorrt_plan"\n'
            f'input [\n  {{ name: "input_ids" data_type: TYPE_INT64 dims: [-1] }}{extra}\n]\n'
            'output [\n  { name: "token_embeddings" data_type: TYPE_FP32 dims: [-1, 384] }\n]\n'
        )
    calls = tmp_path / "calls"
    trtexec = tmp_path / "bin" / "trtexec"
    trtexec.parent.mkdir()
    # Records its arguments and writes the engine file, as trtexec does.
    trtexec.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        'for a; do case "$a" in --saveEngine=*) echo plan > "${a#--saveEngine=}";; esac; done\n'
    )
    trtexec.chmod(trtexec.stat().st_mode | stat.S_IXUSR)
    run = [sys.executable, str(IMAGES / "build_tensorrt_plans.py"), str(repository)]
    path = {**os.environ, "PATH": f"{trtexec.parent}:{os.environ['PATH']}"}
    subprocess.run(run, check=True, env=path, capture_output=True)
    plain, controlled = calls.read_text().splitlines()
    assert "--minShapes=input_ids:1x1 --optShapes=input_ids:32x128 --maxShapes=input_ids:32x512 --fp16" in plain
    assert "--maxShapes=input_ids:32x512,control_log_additive:32x1" in controlled
    assert (repository / "m-encoder" / "1" / "model.plan").exists()
    assert not list(repository.rglob("*.partial"))
    subprocess.run(run, check=True, env=path, capture_output=True)
    assert len(calls.read_text().splitlines()) == 2, "a plan already built is kept"
