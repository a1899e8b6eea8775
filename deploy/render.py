#!/usr/bin/env python3
"""Render deploy/*.yaml from the Helm chart deploy/helm/berth: `deploy/render.py` writes them, `--check` only
compares (exit 1 and a diff when they drifted; tests/unit/test_deploy.py runs the same check).

The files are `helm template` of the chart with its default values into namespace berth, plus the
Namespace object (namespace.create=true: `kubectl apply -k` has nobody else to create it). One file per chart
template, named like the template. helm is the one the lab builds (python3 -m lab.kube_build), so every machine
renders with the same version.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab import kube_build  # noqa: E402

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "berth"
RELEASE = "berth"
NAMESPACE = "berth"
DEPLOY_VALUES = ["--set", "namespace.create=true"]
HEADER = "# Rendered from the Helm chart deploy/helm/berth by deploy/render.py: edit the chart, then run it again.\n"
SOURCE = re.compile(r"^---\n# Source: [^/\n]+/templates/(?P<name>[^\n]+)\n", re.M)


class RenderError(Exception):
    pass


def helm_binary() -> Path | None:
    """The lab's helm, or None while it has not been built."""
    helm = kube_build.bin_dir() / "helm"
    return helm if helm.is_file() else None


def helm(*args: str) -> str:
    """Run helm with args; its stdout, or RenderError with its stderr."""
    binary = helm_binary()
    if binary is None:
        raise RenderError(f"no helm at {kube_build.bin_dir()}: build it with `python3 -m lab.kube_build`")
    result = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RenderError(f"helm {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def template(*extra: str) -> str:
    """`helm template` of the chart (extra: --set/--values arguments) as Kubernetes 1.35 would see it."""
    kube_version = kube_build.KUBERNETES_VERSION.lstrip("v")
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version, *extra)


def split_by_template(text: str) -> dict[str, str]:
    """helm template's output as {template file name: its documents}, in helm's order."""
    files: dict[str, list[str]] = {}
    starts = list(SOURCE.finditer(text))
    if not starts:
        raise RenderError("helm template printed no '# Source:' document")
    for match, following in zip(starts, [*starts[1:], None], strict=True):
        body = text[match.end() : following.start() if following else len(text)].strip("\n")
        files.setdefault(Path(match["name"]).name, []).append(body + "\n")
    return {name: "---\n".join(docs) for name, docs in files.items()}


def rendered() -> dict[str, str]:
    """What deploy/ should hold: {file name: text}."""
    return {name: HEADER + body for name, body in split_by_template(template(*DEPLOY_VALUES)).items()}


def stale_files(wanted: dict[str, str]) -> list[Path]:
    """Rendered files in deploy/ that the chart no longer produces."""
    return [p for p in sorted(DEPLOY.glob("*.yaml")) if p.name not in wanted and p.read_text().startswith(HEADER)]


def drift() -> list[str]:
    """Differences between deploy/ and a fresh render, as unified diffs; empty when they agree."""
    wanted = rendered()
    problems = []
    for name, text in wanted.items():
        path = DEPLOY / name
        current = path.read_text() if path.is_file() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True), f"deploy/{name}", "rendered"
            )
            problems.append("".join(diff))
    problems += [f"deploy/{p.name}: rendered earlier, no longer produced by the chart" for p in stale_files(wanted)]
    return problems


def write() -> None:
    wanted = rendered()
    for name, text in wanted.items():
        (DEPLOY / name).write_text(text)
    for path in stale_files(wanted):
        path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when deploy/ drifted")
    args = parser.parse_args()
    try:
        if not args.check:
            write()
            return 0
        problems = drift()
    except RenderError as err:
        print(f"render: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    if problems:
        print("deploy/ differs from the chart: run deploy/render.py", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
