"""The GitHub Actions files: every workflow passes actionlint; the composite action is well formed."""
from __future__ import annotations

import os
import re
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
    assert {"model-uri", "output", "precision", "args", "python-version", "mlstep-version", "register-as",
            "no-register", "require-gpu", "max-slowdown"} <= set(action["inputs"])
    assert action["inputs"]["model-uri"]["required"] is True
    assert {"fp32-version", "fp16-version", "run-id", "passed", "report"} <= set(action["outputs"])
    assert all("value" in o for o in action["outputs"].values())
    steps = action["runs"]["steps"]
    setup = [s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert setup and setup[0]["with"].get("update-environment") is False     # the caller's python stays
    text = ACTION.read_text()
    assert "GITHUB_PATH" not in text and "git+https" not in text and "action_ref" not in text
    for step in steps:
        if "run" in step:
            assert step.get("shell") == "bash", f"composite run step {step.get('name')!r} needs shell: bash"
    assert "read -r -a extra" not in text     # args are one per line, never split on whitespace


PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


@pytest.mark.parametrize("path", [*WORKFLOWS, ACTION], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_actions_are_pinned_to_commit_shas(path):
    data = _load(path)
    steps = [s for job in (data.get("jobs") or {}).values() for s in job.get("steps") or []]
    steps += (data.get("runs") or {}).get("steps") or []
    for step in steps:
        uses = step.get("uses")
        if uses and not uses.startswith("./"):
            assert PINNED.match(uses), f"{path.name}: {uses} is not pinned to a commit SHA"


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


def _triggers(wf: dict) -> dict:
    return wf.get("on") or wf.get(True)          # YAML 1.1 reads a bare `on` as True


def test_optimize_workflow_contract():
    wf = _load(ROOT / ".github" / "workflows" / "optimize.yml")
    triggers = _triggers(wf)
    assert {"workflow_dispatch", "workflow_call", "repository_dispatch"} <= set(triggers)
    assert triggers["repository_dispatch"]["types"] == ["mlstep-optimize"]      # what `mlstep relay` sends
    assert triggers["workflow_call"]["inputs"]["mlstep-repository"]["required"] is True
    plan, job = wf["jobs"]["plan"], wf["jobs"]["optimize"]
    assert any("plan --alias" in s.get("run", "") for s in plan["steps"])
    assert job["needs"] == "plan"
    assert job["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert "max-parallel" in job["strategy"] and job["strategy"]["fail-fast"] is False
    assert "matrix.model" in job["concurrency"]["group"] and job["concurrency"]["cancel-in-progress"] is False
    for j in (plan, job):    # mlstep from the mlstep repository, never the caller's checkout
        checkout = next(s for s in j["steps"] if str(s.get("uses", "")).startswith("actions/checkout@"))
        assert checkout["with"]["repository"] == "${{ env.MLSTEP_REPOSITORY }}"
        assert checkout["with"]["path"] == "mlstep-src"
        assert any("pip install --quiet ./mlstep-src" in s.get("run", "") for s in j["steps"])
    text = (ROOT / ".github" / "workflows" / "optimize.yml").read_text()
    assert "--require-gpu" in text and "secrets.MLFLOW_TRACKING_URI" in text and "GITHUB_PATH" not in text
    assert "cache: pip" in text
    upload = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    assert upload and upload[0].get("if") == "always()"


def test_promote_workflow_is_gated_callable_and_summarizes_a_refusal():
    wf = _load(ROOT / ".github" / "workflows" / "promote.yml")
    assert {"workflow_dispatch", "workflow_call"} <= set(_triggers(wf))
    job = wf["jobs"]["promote"]
    assert job.get("environment") == "production"
    script = next(s["run"] for s in job["steps"] if "mlstep" in s.get("run", "") and " promote " in s["run"])
    assert "|| code=$?" in script and script.index("GITHUB_STEP_SUMMARY") < script.index('exit "$code"')


def test_promote_summary_is_written_when_refused(tmp_path):
    """The promote step's script under bash -e with a stand-in mlstep that refuses (exit 1): the summary is
    written and the step still fails with mlstep's exit code."""
    wf = _load(ROOT / ".github" / "workflows" / "promote.yml")
    script = next(s["run"] for s in wf["jobs"]["promote"]["steps"] if " promote " in s.get("run", ""))
    venv_bin = tmp_path / "mlstep-venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake = venv_bin / "mlstep"
    fake.write_text("#!/bin/sh\necho 'mlstep: error: models:/m/3 did not pass its gates' >&2\nexit 1\n")
    fake.chmod(0o755)
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    env = {"PATH": os.environ["PATH"], "RUNNER_TEMP": str(tmp_path), "GITHUB_STEP_SUMMARY": str(summary),
           "GITHUB_OUTPUT": str(output), "MODEL_VERSION_URI": "models:/m/3", "ALIAS": "champion"}
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", script], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    text = summary.read_text()
    assert text.startswith("### mlstep promote: refused") and "did not pass its gates" in text
    assert output.read_text() == "promoted=false\n"


def test_ci_installs_cpu_wheels():
    wf = _load(ROOT / ".github" / "workflows" / "ci.yml")
    script = "\n".join(s.get("run", "") for s in wf["jobs"]["test"]["steps"])
    assert "--index-url https://download.pytorch.org/whl/cpu" in script
    assert "--no-deps -e ." in script and "make install" not in script and "[dev]" not in script
    assert "CUDAExecutionProvider' not in" in script


def test_ci_cpu_requirements_swap_onnxruntime_gpu(tmp_path):
    """The CI install step's requirement rewrite, run on this pyproject.toml."""
    wf = _load(ROOT / ".github" / "workflows" / "ci.yml")
    script = "\n".join(s.get("run", "") for s in wf["jobs"]["test"]["steps"])
    program = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    reqs = proc.stdout.split()
    assert "onnxruntime>=1.20" in reqs and not any(r.startswith(("onnxruntime-gpu", "torch")) for r in reqs)
    assert any(r.startswith("mlflow") for r in reqs) and any(r.startswith("pytest") for r in reqs)
