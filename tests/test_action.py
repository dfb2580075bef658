"""The composite action run as a caller's job runs it: its ``run:`` scripts, taken from action.yml, executed by
bash in a temp workspace with GITHUB_ACTION_PATH (a copy of the repository's tracked files, as GitHub checks
out an action), RUNNER_TEMP, GITHUB_OUTPUT and the step ``env:`` GitHub would give them.

Offline: the install step's ``pip install`` finds mlstep's dependencies already installed (this venv's
site-packages, mlstep itself left out, on PYTHONPATH) and builds mlstep from the action's folder; the step
itself runs unchanged. The model is a committed Keras BERT fixture; variants register on the real server.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / ".github" / "actions" / "mlstep" / "action.yml"
MODEL = ROOT / "tests" / "tf_fixtures" / "bert_keras_op17_h2_nott_i64.onnx"


def steps() -> dict[str, dict]:
    return {s["id"]: s for s in yaml.safe_load(ACTION.read_text())["runs"]["steps"] if "id" in s}


def expand(value, context: dict[str, str]) -> str:
    """GitHub's ``${{ inputs.x }}`` / ``${{ steps.y.outputs.z }}`` / ``${{ runner.os }}`` substitution (the
    only expression forms the action's step ``env:`` uses)."""
    def one(match):
        key = match.group(1).strip()
        assert key in context, f"action.yml uses {key!r}, which the test does not provide"
        return context[key]

    return re.sub(r"\$\{\{(.*?)\}\}", one, str(value))


class Runner:
    """Runs the action's steps in order, the way the runner does: env per step, outputs via GITHUB_OUTPUT."""

    def __init__(self, tmp: Path, inputs: dict[str, str], env: dict[str, str]):
        self.tmp, self.env = tmp, env
        action = yaml.safe_load(ACTION.read_text())
        self.context = {f"inputs.{k}": str(v.get("default", "")) for k, v in action["inputs"].items()}
        self.context |= {f"inputs.{k}": v for k, v in inputs.items()}
        self.context |= {"runner.os": "Linux", "runner.arch": "X64", "runner.temp": env["RUNNER_TEMP"],
                         "github.action_path": env["GITHUB_ACTION_PATH"]}
        self.outputs: dict[str, dict[str, str]] = {}

    def run(self, step_id: str) -> subprocess.CompletedProcess:
        step = steps()[step_id]
        out_file = self.tmp / f"output-{step_id}-{len(self.outputs)}"
        out_file.write_text("")
        env = self.env | {k: expand(v, self.context) for k, v in (step.get("env") or {}).items()}
        env["GITHUB_OUTPUT"] = str(out_file)
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", step["run"]],
                              cwd=self.env["GITHUB_WORKSPACE"], env=env, capture_output=True, text=True,
                              timeout=300)
        got = dict(line.split("=", 1) for line in out_file.read_text().splitlines() if "=" in line)
        self.outputs[step_id] = got
        self.context |= {f"steps.{step_id}.outputs.{k}": v for k, v in got.items()}
        return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The locate + install steps, once: (action folder, runner env, install outputs)."""
    tmp = tmp_path_factory.mktemp("action")
    checkout = tmp / "actions-checkout"           # what GitHub fetches for `uses: OWNER/mlstep/...@REF`
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file() and not name.startswith(("tests/", "benchmarks/", "examples/")):
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    deps = tmp / "site-packages"                  # this venv's packages without mlstep: the offline "index"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("mlstep", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (tmp / "workspace").mkdir()
    (tmp / "runner").mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "LANG": "C.UTF-8",
           "GITHUB_ACTION_PATH": str(checkout / ".github" / "actions" / "mlstep"),
           "GITHUB_WORKSPACE": str(tmp / "workspace"), "RUNNER_TEMP": str(tmp / "runner"),
           "GITHUB_STEP_SUMMARY": str(tmp / "summary.md"), "GITHUB_ACTIONS": "true",
           "PYTHONPATH": str(deps), "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    runner = Runner(tmp, {}, env)
    proc = runner.run("locate")
    assert proc.returncode == 0, proc.stderr
    assert runner.outputs["locate"]["src"] == str(checkout)
    runner.context["steps.python.outputs.python-path"] = sys.executable     # actions/setup-python's output
    proc = runner.run("install")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "mlstep 0.1.0"
    return runner.env, runner.outputs


def test_install_is_the_actions_own_folder_in_its_own_venv(installed):
    env, outputs = installed
    mlstep = outputs["install"]["mlstep"]
    assert mlstep == f"{env['RUNNER_TEMP']}/mlstep-venv/bin/mlstep"
    proc = subprocess.run([str(Path(mlstep).parent / "python"), "-c", "import mlstep; print(mlstep.__file__)"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=env["GITHUB_WORKSPACE"])
    assert proc.stdout.strip().startswith(f"{env['RUNNER_TEMP']}/mlstep-venv/"), proc.stdout + proc.stderr
    assert "GITHUB_PATH" not in ACTION.read_text()        # the caller's PATH is never changed


def run_action(installed, tmp_path, inputs: dict[str, str], extra_env: dict[str, str]) -> Runner:
    env, outputs = installed
    runner = Runner(tmp_path, inputs, env | extra_env)
    runner.context |= {f"steps.install.outputs.{k}": v for k, v in outputs["install"].items()}
    runner.optimize = runner.run("optimize")
    runner.context["steps.optimize.outputs.exit-code"] = runner.outputs["optimize"].get("exit-code", "")
    assert runner.run("outputs").returncode == 0
    return runner


def test_optimize_registers_and_sets_outputs(installed, mlflow_server, tmp_path):
    runner = run_action(installed, tmp_path, {
        "model-uri": str(MODEL), "output": "out dir", "precision": "fp32, fp16",
        "register-as": "action-bert", "args": "--skip-benchmark\n--experiment\naction test experiment\n"},
        {"MLFLOW_TRACKING_URI": mlflow_server})
    assert runner.optimize.returncode == 0, runner.optimize.stdout + runner.optimize.stderr
    got = runner.outputs["outputs"]
    workspace = Path(installed[0]["GITHUB_WORKSPACE"])
    assert got["passed"] == "true"
    assert got["report"] == "out dir/report.json" and (workspace / got["report"]).is_file()
    assert got["report-md"] == "out dir/report.md"
    assert (got["fp32-version"], got["fp16-version"], got["registered-model"]) == ("1", "2", "action-bert")
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server, mlflow_server)
    run = client.get_run(got["run-id"])
    assert client.get_experiment(run.info.experiment_id).name == "action test experiment"   # one argument
    assert client.get_model_version("action-bert", "2").tags["mlstep.variant"] == "fp16"


def test_an_argument_with_spaces_stays_one_argument(installed, tmp_path):
    runner = run_action(installed, tmp_path, {"model-uri": str(MODEL), "no-register": "true",
                                              "args": "--model-type\nbert large"}, {})
    assert runner.optimize.returncode == 2
    assert "bert large" in runner.optimize.stderr, runner.optimize.stderr
    got = runner.outputs["outputs"]
    assert (got["passed"], got["fp32-version"], got["run-id"]) == ("false", "", "")
