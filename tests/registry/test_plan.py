"""``mlstep plan`` against the real session ``mlflow server``: variants published the way the step publishes them
(``registry.publish`` + ``finish``), then the console script prints the matrix of what is left to do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from registry_helpers import client, files, step_publish, tiny_model  # noqa: E402,F401 - fixtures

from mlstep import registry  # noqa: E402

MLSTEP = [str(Path(sys.executable).parent / "mlstep")]


def plan(tracking: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_TRACKING_URI": tracking}
    return subprocess.run([*MLSTEP, "plan", *flags], env=env, capture_output=True, text=True, timeout=300)


def register_source(client, tracking: str, path: Path, name: str) -> str:
    """An ONNX model logged with MLflow's ONNX flavor and registered as a new version of ``name``."""
    import mlflow
    import mlflow.onnx
    import onnx

    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    with mlflow.start_run():
        info = mlflow.onnx.log_model(onnx.load(str(path)), name="model", registered_model_name=name,
                                     pip_requirements=["onnx"])
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def registry_state(mlflow_server, tmp_path_factory):
    """plan-todo@candidate: nothing published; plan-done@candidate: both variants passed (registered as
    plan-done-opt, which then also gets @candidate: a variant is never planned); plan-failed@candidate: its
    variants failed their gates; plan-moved: v1 done, @candidate moved to v2; plan-noalias: no @candidate."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("plan")
    c = MlflowClient(mlflow_server, mlflow_server)
    store = registry.Store(mlflow_server)

    def source(name: str, seed: int) -> str:
        return register_source(c, mlflow_server, tiny_model(tmp / f"{name}-{seed}.onnx", seed), name)

    def bare(name: str) -> str:
        """A version nothing will download (the plan reads tags and aliases only)."""
        if not c.search_registered_models(f"name = '{name}'"):
            c.create_registered_model(name)
        run = c.create_run(experiment_id="0")
        return c.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version

    def variants(seed: int) -> dict[str, Path]:
        return {v: tiny_model(tmp / f"{v}-{seed}.onnx", seed + i) for i, v in enumerate(("fp32", "fp16"), 1)}

    for name, seed in (("plan-done", 20), ("plan-failed", 30)):
        c.set_registered_model_alias(name, "candidate", source(name, seed))
    c.set_registered_model_alias("plan-todo", "candidate", bare("plan-todo"))
    bare("plan-noalias")
    pub = step_publish(store, "models:/plan-done@candidate", "plan-done-opt", variants(20))
    assert {r.status for r in pub.registrations.values()} == {"registered"}
    c.set_registered_model_alias("plan-done-opt", "candidate", "1")
    step_publish(store, "models:/plan-failed@candidate", "plan-failed-opt", variants(30),
                 passed={"fp32": False, "fp16": False})
    c.set_registered_model_alias("plan-moved", "candidate", source("plan-moved", 40))
    step_publish(store, "models:/plan-moved@candidate", "plan-moved-opt", variants(40))
    c.set_registered_model_alias("plan-moved", "candidate", bare("plan-moved"))
    return mlflow_server


def entry(name: str, version: str) -> dict:
    return {"model": name, "version": version, "alias": "candidate", "model-uri": f"models:/{name}/{version}"}


def test_plan_lists_versions_without_a_passing_variant(registry_state):
    proc = plan(registry_state, "--alias", "candidate", "--model-filter", "plan-*")
    assert proc.returncode == 0, proc.stderr
    matrix = json.loads(proc.stdout)
    assert sorted(matrix["include"], key=lambda e: e["model"]) == [
        entry("plan-failed", "1"), entry("plan-moved", "2"), entry("plan-todo", "1")]
    why = proc.stderr
    assert "models:/plan-done/1 (@candidate): done (fp16 models:/plan-done-opt/2, fp32 models:/plan-done-opt/1)" in why
    assert "models:/plan-done-opt/1 (@candidate): an mlstep fp32 variant itself: skipped" in why
    assert "plan-noalias: no @candidate: skipped" in why
    assert "models:/plan-failed/1 (@candidate): no passing mlstep variant: planned" in why


def plan_in_process(tracking: str, monkeypatch, capsys, *flags: str) -> tuple[int, dict, str]:
    """The same command in this process (no interpreter start): exit code, matrix, stderr."""
    from mlstep.cli.main import main

    for var in [v for v in os.environ if v.startswith("MLFLOW_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    code = main(["plan", *flags])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else {}, err


def test_plan_named_model_limit_and_empty(registry_state, monkeypatch, capsys):
    code, matrix, err = plan_in_process(registry_state, monkeypatch, capsys, "--model", "plan-todo", "--model",
                                        "plan-done")
    assert (code, matrix) == (0, {"include": [entry("plan-todo", "1")]}), err

    code, matrix, err = plan_in_process(registry_state, monkeypatch, capsys, "--model-filter", "plan-[mt]*",
                                        "--max", "1")
    assert code == 0 and len(matrix["include"]) == 1, err
    assert "over --max 1: left for the next plan" in err

    code, matrix, err = plan_in_process(registry_state, monkeypatch, capsys, "--alias", "champion",
                                        "--model-filter", "plan-*")
    assert (code, matrix) == (0, {"include": []}), err

    code, _, err = plan_in_process(registry_state, monkeypatch, capsys, "--alias", "v3")
    assert code == 2 and err.strip().splitlines() == [
        "mlstep: error: invalid alias 'v3' (letters, digits, '-' and '_'; not 'latest' or 'v<number>')"]


def test_plan_unknown_model_is_one_line_exit_2(registry_state):
    proc = plan(registry_state, "--model", "plan-nonexistent")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "models:/plan-nonexistent: not found" in lines[0], proc.stderr


def test_optimize_workflows_plan_step_on_a_dispatched_event(registry_state, tmp_path):
    """optimize.yml's plan step (its script, as the runner runs it) for the repository_dispatch `mlstep relay`
    sends: the matrix and count outputs come from the real registry; a payload without alias (a new version)
    is that version alone."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    wf = yaml.safe_load((root / ".github" / "workflows" / "optimize.yml").read_text())
    step = next(s for s in wf["jobs"]["plan"]["steps"] if s.get("id") == "plan")
    venv_bin = tmp_path / "mlstep-venv" / "bin"                 # the install step's venv: this interpreter
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    (venv_bin / "mlstep").symlink_to(MLSTEP[0])

    def run(**payload: str) -> dict[str, str]:
        output = tmp_path / "output"
        output.write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env |= {"MLFLOW_TRACKING_URI": registry_state, "RUNNER_TEMP": str(tmp_path), "GITHUB_OUTPUT": str(output),
                "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"), "EVENT": "repository_dispatch",
                "MODEL_URI": "", "MODEL_FILTER": "", "ALIAS": payload.get("alias") or "candidate",
                "DISPATCHED_MODEL": payload["model"], "DISPATCHED_VERSION": payload["version"],
                "DISPATCHED_ALIAS": payload.get("alias", "")}
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", step["run"]], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return dict(line.split("=", 1) for line in output.read_text().splitlines())

    got = run(model="plan-todo", version="1", alias="candidate")
    assert got["count"] == "1" and json.loads(got["matrix"]) == {"include": [entry("plan-todo", "1")]}
    got = run(model="plan-done", version="1", alias="candidate")
    assert got["count"] == "0" and json.loads(got["matrix"]) == {"include": []}
    got = run(model="plan-noalias", version="1")
    assert json.loads(got["matrix"]) == {"include": [{"model": "plan-noalias", "model-uri": "models:/plan-noalias/1"}]}
