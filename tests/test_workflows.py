"""The GitHub Actions files: every workflow passes actionlint; the composite action is well formed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTION = ROOT / ".github" / "actions" / "mlstep" / "action.yml"


def _actionlint() -> str | None:
    """$ACTIONLINT, else the venv's (the dev extra's wheel ships the binary), else PATH."""
    explicit = os.environ.get("ACTIONLINT")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.is_file() else shutil.which("actionlint")


def test_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "optimize.yml", "promote.yml"}


def test_actionlint_passes():
    binary = _actionlint()
    if binary is None:
        pytest.skip("actionlint binary not found (pip install -e '.[dev]' installs it)")
    proc = subprocess.run([binary, "-no-color", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def test_composite_action_is_well_formed():
    action = _load(ACTION)
    for key in ("name", "description", "inputs", "outputs", "runs"):
        assert key in action, f"action.yml: missing {key!r}"
    assert action["runs"]["using"] == "composite"
    assert {"model-uri", "output", "precision", "args", "python-version", "mlstep-version", "mlstep-ref"} \
        <= set(action["inputs"])
    assert action["inputs"]["model-uri"]["required"] is True
    assert "report" in action["outputs"] and "value" in action["outputs"]["report"]
    steps = action["runs"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/setup-python@") for u in uses)
    assert any(u.startswith("actions/upload-artifact@v4") for u in uses)
    for step in steps:
        if "run" in step:
            assert step.get("shell") == "bash", f"composite run step {step.get('name')!r} needs shell: bash"


def _run_scripts(data: dict):
    jobs = data.get("jobs") or {}
    for job in jobs.values():
        for step in job.get("steps") or []:
            if "run" in step:
                yield step["run"]
    for step in (data.get("runs") or {}).get("steps") or []:
        if "run" in step:
            yield step["run"]


@pytest.mark.parametrize("path", [*WORKFLOWS, ACTION], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_expression_in_run_scripts(path):
    """Inputs reach scripts through env vars only: no ${{ }} inside a run: block (script injection)."""
    for script in _run_scripts(_load(path)):
        assert "${{" not in script, f"{path.name}: expression inside a run script:\n{script}"


def test_optimize_workflow_contract():
    wf = _load(ROOT / ".github" / "workflows" / "optimize.yml")
    triggers = wf.get("on") or wf.get(True)          # YAML 1.1 reads a bare `on` as True
    assert {"workflow_dispatch", "workflow_call"} <= set(triggers)
    job = wf["jobs"]["optimize"]
    text = (ROOT / ".github" / "workflows" / "optimize.yml").read_text()
    assert "--require-gpu" in text and "secrets.MLFLOW_TRACKING_URI" in text
    upload = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact@v4")]
    assert upload and upload[0].get("if") == "always()"


def test_promote_workflow_is_gated_by_an_environment():
    wf = _load(ROOT / ".github" / "workflows" / "promote.yml")
    job = wf["jobs"]["promote"]
    assert job.get("environment") == "production"
    assert any("mlstep promote" in s.get("run", "") for s in job["steps"])
