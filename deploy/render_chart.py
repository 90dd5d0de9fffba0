"""Renders the Helm chart offline, as `helm template` would, with Helm's own Go library (helm-python-sdk): no helm
binary and no cluster. It runs in .venv-checks, where bin/setup installs the deployment check tools.

  .venv-checks/bin/python deploy/render_chart.py -f deploy/helm/embedding-service/values-gpu.yaml > gpu.yaml
  .venv-checks/bin/python deploy/render_chart.py --set-json '{"triton": {"mode": "sidecar"}}' --lint
  .venv-checks/bin/python deploy/render_chart.py --api-versions monitoring.coreos.com/v1 > with-prometheus-operator.yaml

Prints every manifest as one YAML stream (NOTES.txt left out, as helm template does), or Helm's error and exits 1
when a template fails, a `fail` or `required` included. --lint runs `helm lint` on the chart first and exits 1 on a
warning or an error. As with helm template, the cluster is taken to serve Kubernetes' own APIs only, and those named
by --api-versions (group/version, or group/version/Kind) besides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import helm_python as helm
import yaml
from helm_python import _native

CHART = Path(__file__).resolve().parent / "helm" / "embedding-service"
# helm lint's severities: 1 info, 2 warning, 3 error.
LINT_WARNING = 2


def merged(base: dict, override: dict) -> dict:
    """Helm's merge of values files: maps merge key by key, the later file wins everything else (lists too)."""
    result = dict(base)
    for key, value in override.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result


def user_values(values_files: list[Path], set_json: list[str]) -> dict:
    values: dict = {}
    for path in values_files:
        values = merged(values, yaml.safe_load(path.read_text()) or {})
    for overrides in set_json:
        values = merged(values, json.loads(overrides))
    return values


def render(values: dict, release: str, namespace: str, api_versions: list[str], chart: Path = CHART) -> str:
    options = {"name": release, "namespace": namespace, "is_install": True, "api_versions": api_versions}
    with helm.Chart.load(chart) as loaded:
        # Chart.render (helm-python-sdk 0.2.2) has no api_versions argument; the library's render call under it
        # takes the option, as helm template's --api-versions.
        manifests = json.loads(_native.call_string("helm_render", loaded._raw(), json.dumps(values), json.dumps(options)))
    documents = [
        f"# Source: {path}\n{text.strip()}\n"
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt") and text.strip()
    ]
    return "---\n".join(documents)


def lint_findings(values: dict, chart: Path = CHART) -> list[str]:
    report = helm.lint(chart, values, strict=True)
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= LINT_WARNING] + report["errors"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--values", type=Path, action="append", default=[], help="values file; later ones win")
    parser.add_argument("--set-json", action="append", default=[], help="values as a JSON object, applied after the files")
    parser.add_argument("--release", default="embedding", help="release name")
    parser.add_argument("--namespace", default="embedding", help="release namespace")
    parser.add_argument("--lint", action="store_true", help="helm lint the chart with these values first")
    parser.add_argument(
        "-a",
        "--api-versions",
        action="append",
        default=[],
        help="an API the cluster serves besides Kubernetes' own, e.g. monitoring.coreos.com/v1",
    )
    args = parser.parse_args(argv)
    values = user_values(args.values, args.set_json)
    if args.lint:
        findings = lint_findings(values)
        if findings:
            print("helm lint:\n" + "\n".join(findings), file=sys.stderr)
            return 1
    try:
        sys.stdout.write(render(values, args.release, args.namespace, args.api_versions))
    except helm.HelmError as error:
        print(f"helm: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
