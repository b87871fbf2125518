""".github/workflows: valid for GitHub (actionlint), and the same make targets as .ci/run.

actionlint is the Go module github.com/rhysd/actionlint, built once with ``go install``
and cached by streams_dev.tools. It is shown to reject a broken copy of the workflow, so a
linter that passes everything is caught.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streams_dev import tools

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
CI_RUN = REPO / ".ci" / "run"
MAKE_CALL = re.compile(r"^\s*make\s+([A-Za-z][\w-]*)", re.MULTILINE)


@pytest.fixture(scope="module")
def actionlint() -> Path:
    return tools.actionlint()


def lint(actionlint: Path, *files: Path) -> subprocess.CompletedProcess:
    # shellcheck and pyflakes off: the result must not depend on what else the machine has
    # (every run step is a make call anyway, see below).
    argv = [str(actionlint), "-no-color", "-shellcheck=", "-pyflakes=", *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def workflow() -> dict:
    doc = yaml.safe_load(CI.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def job_targets(job: dict) -> list[str]:
    return [m for step in job["steps"] if "run" in step for m in MAKE_CALL.findall(step["run"])]


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))


def test_actionlint_accepts_the_workflows(actionlint):
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert files
    result = lint(actionlint, *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "finding"),
    [
        ("needs: [ci, image]", "needs: [ci, images]", "images"),  # a job that does not exist
        ("${{ vars.IMAGE_REGISTRY }}", "${{ vars.IMAGE_REGISTRY ", "expression"),  # unclosed expression
        ("steps.lint.outcome", "steps.lnit.outcome", "lnit"),  # a step id that does not exist
        ("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.4", "ubuntu-24.4"),  # no such runner
    ],
)
def test_actionlint_rejects_a_broken_copy(actionlint, tmp_path, old, new, finding):
    text = CI.read_text()
    assert old in text
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new, 1))
    result = lint(actionlint, broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert finding in result.stdout


def test_the_ci_job_runs_the_make_targets_of_ci_run_in_order():
    ci_run = MAKE_CALL.findall(CI_RUN.read_text())
    assert ci_run[:3] == ["install", "tools", "lint"] and "test" in ci_run and "containers-test" in ci_run
    assert job_targets(workflow()["jobs"]["ci"]) == ci_run


def test_the_comparison_notices_a_drift():
    drifted = CI_RUN.read_text().replace("make lint", "make unit")
    assert MAKE_CALL.findall(drifted) != job_targets(workflow()["jobs"]["ci"])


def test_every_run_step_is_one_existing_make_target():
    """Nothing but make targets, so no job can do something .ci/run or a developer cannot."""
    targets = makefile_targets()
    for name, job in workflow()["jobs"].items():
        for step in job["steps"]:
            if "run" in step:
                assert re.fullmatch(r"make [A-Za-z][\w-]*", step["run"].strip()), (name, step["run"])
                assert step["run"].split()[1] in targets, (name, step["run"])


def test_what_runs_on_a_push_and_what_only_on_a_version_tag():
    doc = workflow()
    assert doc["on"]["push"]["branches"] == ["**"] and doc["on"]["push"]["tags"] == ["v*"]
    jobs = doc["jobs"]
    assert "if" not in jobs["ci"] and "if" not in jobs["image"]  # every push
    assert job_targets(jobs["image"]) == ["install", "hadolint", "image"]
    release = jobs["release"]
    assert "refs/tags/v" in release["if"] and set(release["needs"]) == {"ci", "image"}
    assert job_targets(release) == ["install", "k8s-check", "image-push"]
    push = next(step for step in release["steps"] if step.get("run") == "make image-push")
    assert push["env"]["IMAGE_REGISTRY"] == "${{ vars.IMAGE_REGISTRY }}"


def test_actions_are_pinned_to_commits():
    for job in workflow()["jobs"].values():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]


def test_image_push_refuses_without_a_registry():
    make = shutil.which("make")
    assert make, "make not installed"
    result = subprocess.run(
        [make, "-s", "image-push", "IMAGE_REGISTRY="], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == "image-push: set IMAGE_REGISTRY, e.g. ghcr.io/<owner>"
