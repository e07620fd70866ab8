"""The release pipeline (.github/workflows/release.yml), checked without running it.

``check-jsonschema`` (test extra) validates the workflow against the GitHub
Actions workflow schema it ships; a small check does what the schema cannot
(every ``needs.*.outputs.*`` and ``steps.*.outputs.*`` names something that
exists, every ``run`` script parses as bash). actionlint itself is not used:
its Python package downloads its binary from outside the package registries
when it installs, which this project's machines cannot reach.
The other tests check that the names agree across the three places that
spell them: the workflow's default registry and org give the chart's
default ``image.name``; the tags it pushes are what the chart renders for
each backend; the variants it builds are the Dockerfile's; the base it pins
by digest is the Dockerfile's ``BASE_IMAGE``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import BIN, CHART, ROOT, Helm, one
from tests.deploy.test_dockerfile import VARIANT_EXTRAS, instructions, variant_extras

WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the GitHub Actions workflow schema it ships (no network)."""
    found = shutil.which("check-jsonschema", path=str(BIN)) or shutil.which("check-jsonschema")
    assert found, "check-jsonschema is missing: it comes with the test extra"
    return subprocess.run([found, "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, timeout=60)


def _step_env(job: str, step_id: str) -> dict[str, str]:
    [step] = [s for s in workflow()["jobs"][job]["steps"] if s.get("id") == step_id]
    env: dict[str, str] = step["env"]
    return env


def _default(expression: str) -> str:
    """The literal fallback of ``${{ vars.X || 'default' }}``."""
    match = re.fullmatch(r"\$\{\{ vars\.\w+ \|\| '([^']+)' \}\}", expression)
    assert match, expression
    return match.group(1)


def test_the_workflow_matches_the_github_actions_schema(tmp_path: Path) -> None:
    proc = _check_jsonschema(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The schema is strict enough to matter: a misspelt key fails.
    bad = tmp_path / "release.yml"
    bad.write_text(WORKFLOW.read_text().replace("runs-on:", "run-on:", 1))
    assert _check_jsonschema(bad).returncode != 0


def references(text: str, pattern: str) -> set[tuple[str, ...]]:
    return set(re.findall(pattern, text))


def test_every_expression_names_what_exists() -> None:
    """What actionlint would check and the schema cannot: ``needs.J.outputs.O`` names a
    job this one needs and an output J declares; ``steps.S.outputs.O`` a step S of the
    same job that sets O; every ``run`` script parses as bash."""
    jobs = workflow()["jobs"]
    for name, job in jobs.items():
        text = yaml.safe_dump(job)
        needs = job.get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        for other, output in references(text, r"needs\.(\w+)\.outputs\.(\w+)"):
            assert other in needs, (name, other)
            assert output in jobs[other]["outputs"], (name, other, output)
        ids = {step["id"]: step for step in job["steps"] if "id" in step}
        for step_id, output in references(text, r"steps\.(\w+)\.outputs\.(\w+)"):
            assert step_id in ids, (name, step_id)
            assert re.search(rf"\b{output}=", ids[step_id]["run"]), (name, step_id, output)
        for step in job["steps"]:
            if "run" in step:
                script = re.sub(r"\$\{\{.*?\}\}", "x", step["run"])
                proc = subprocess.run(["bash", "-n"], input=script, capture_output=True,
                                      text=True, timeout=10)
                assert proc.returncode == 0, (name, step.get("name"), proc.stderr)


def test_the_chart_defaults_to_what_the_pipeline_publishes(helm: Helm) -> None:
    env = _step_env("names", "names")
    image = f"{_default(env['REGISTRY'])}/{_default(env['ORG']).lower()}/session-broker"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["name"] == image
    assert values["image"]["tag"] == ""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert project and chart["appVersion"] == project.group(1)

    # The image job's tags: <image>:<version><suffix>, one per Dockerfile variant.
    job = workflow()["jobs"]["image"]
    suffixes = {row["variant"]: row["suffix"] for row in job["strategy"]["matrix"]["include"]}
    assert set(suffixes) == set(VARIANT_EXTRAS)
    build = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert set(variant_extras(build)) == set(suffixes)
    [push] = [s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push")]
    assert push["with"]["tags"] == ("${{ needs.names.outputs.image }}:"
                                    "${{ needs.names.outputs.version }}${{ matrix.suffix }}")
    args = dict(line.split("=", 1) for line in push["with"]["build-args"].splitlines())
    assert args["VARIANT"] == "${{ matrix.variant }}"
    assert args["BASE_IMAGE"] == "${{ needs.names.outputs.base }}"

    # What the chart renders for each backend is one of the pushed tags.
    for value_set, variant in (("local", "local"), ("z2jh", "lean"), ("binderhub", "lean")):
        deployment = one(helm.template(value_set), "Deployment")
        [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                       if c["name"] == "broker"]
        assert container["image"] == f"{image}:{chart['appVersion']}{suffixes[variant]}", \
            value_set


def test_the_base_is_pinned_from_the_dockerfile_tag() -> None:
    """The workflow resolves the Dockerfile's BASE_IMAGE tag (the line it reads) to a digest."""
    [step] = [s for s in workflow()["jobs"]["names"]["steps"] if s.get("id") == "base"]
    pattern = re.search(r"sed -n 's/\^ARG BASE_IMAGE=\\\(\.\*\\\)\$/\\1/p' Dockerfile",
                        step["run"])
    assert pattern, step["run"]
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines()
             if re.fullmatch(r"ARG BASE_IMAGE=.*", line)]
    assert len(lines) == 1 and lines[0].endswith("-slim"), lines  # one line, a tag to resolve
    assert "imagetools inspect" in step["run"] and "sha256:*" in step["run"]


@pytest.mark.parametrize("image", ["registry.example/org/session-broker"])
def test_the_chart_job_points_the_packaged_chart_at_its_image(tmp_path: Path,
                                                              image: str) -> None:
    """The chart job's own shell step, run on a copy of the chart."""
    [step] = [s for s in workflow()["jobs"]["chart"]["steps"]
              if s.get("name", "").startswith("Point the chart")]
    copy = tmp_path / "helm" / "session-broker"
    shutil.copytree(CHART, copy)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", step["run"]], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "IMAGE": image}, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    values = yaml.safe_load((copy / "values.yaml").read_text())
    assert values["image"]["name"] == image
    # Nothing else moved: every other value is as in the repository.
    original = yaml.safe_load((CHART / "values.yaml").read_text())
    original["image"]["name"] = image
    assert values == original
