"""The command line as a new user meets it (issue 12's frictions): comma lists, help for people, a GPU
fallback stated with the loader's cause, a hint when no tracking URI is set, stage lines in CI (groups under
GitHub Actions), ``--verbose`` on stderr. Real subprocesses of the console script."""
from __future__ import annotations

import json
import re

import pytest

from mlstep import runtime
from mlstep.export import ExportSpec
from test_cli import mlstep

COMMANDS = ["optimize", "benchmark", "promote", "export"]
NO_CUDA = pytest.mark.skipif(runtime.cuda_loads(), reason="CUDA loads here: nothing falls back")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_written_for_people(command):
    proc = mlstep(command, "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"<(bool|str|int|float|path|list)", proc.stdout), proc.stdout
    assert "{" not in proc.stdout.split("\n\n", 2)[1] and "x>=" not in proc.stdout, proc.stdout
    assert "the seed's" not in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def under_actions(exported, tmp_path_factory):
    """``optimize -p fp32,fp16 --use-gpu --verbose`` as a GitHub Actions step runs it (stderr not a terminal)."""
    out = tmp_path_factory.mktemp("actions") / "out"
    proc = mlstep("optimize", exported(ExportSpec("bert")), "-o", out, "-p", "fp32,fp16", "--use-gpu", "--verbose",
                  "--skip-benchmark", env={"GITHUB_ACTIONS": "true"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_a_comma_list_of_precisions_is_accepted_like_benchmarks(under_actions, tmp_path):
    _, report, _ = under_actions
    assert list(report["variants"]) == ["fp32", "fp16"] and report["options"]["precision"] == ["fp32", "fp16"]
    bad = mlstep("optimize", tmp_path / "m.onnx", "-o", tmp_path / "o", "-p", "fp32,int8")
    assert bad.returncode == 2 and bad.stderr.splitlines() == ["mlstep: error: unknown precision 'int8' "
                                                               "(choose from fp32, fp16)"], bad.stderr


def test_under_github_actions_each_stage_is_a_log_group(under_actions):
    proc, _, _ = under_actions
    lines = proc.stderr.splitlines()
    groups = [line for line in lines if line.startswith("::group::mlstep ")]
    assert [g.split()[1] for g in groups] == ["resolve", "optimize", "forms", "variants", "parity", "report", "commit"]
    assert lines.count("::endgroup::") == len(groups)


def test_verbose_goes_to_stderr_and_stdout_stays_the_summary(under_actions):
    proc, _, _ = under_actions
    assert "fused" in proc.stderr and re.search(r"^\w+: fused \d+", proc.stderr, re.M), proc.stderr
    assert not re.search(r"^\w+: fused \d+", proc.stdout, re.M) and "refused:" not in proc.stdout, proc.stdout
    assert "mlstep optimize ->" in proc.stdout


@NO_CUDA
def test_use_gpu_without_cuda_says_it_ran_on_the_cpu_and_why(under_actions):
    proc, report, markdown = under_actions
    reason = runtime.cuda_unavailable_reason()
    fallback = report["runtime"]["gpu_fallback"]
    assert report["runtime"]["providers"] == ["CPUExecutionProvider"] and report["runtime"]["use_gpu"] is True
    assert fallback == f"--use-gpu: ran on the CPU because CUDAExecutionProvider did not load ({reason})"
    assert "\n" not in fallback and ("cannot open shared object" in reason or "without CUDA" in reason), reason
    assert f"runtime: CPUExecutionProvider: {fallback}" in proc.stdout
    assert f"- runtime: **CPUExecutionProvider: {fallback}**" in markdown
    assert "onnxruntime:" not in proc.stderr and "provider_bridge" not in proc.stderr, proc.stderr


@NO_CUDA
def test_require_gpu_names_the_missing_library(exported, tmp_path):
    proc = mlstep("optimize", exported(ExportSpec("bert")), "-o", tmp_path / "o", "--require-gpu")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"did not load ({runtime.cuda_unavailable_reason()})" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_ci_without_actions_prints_one_line_per_stage_start_and_end(exported, tmp_path):
    proc = mlstep("optimize", exported(ExportSpec("bert")), "-o", tmp_path / "o", "-p", "fp32", "--skip-benchmark",
                  env={"CI": "true"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    starts = [line.split()[1] for line in lines if line.endswith("...") or " ... " in line]
    ends = [line.split()[1].rstrip(":") for line in lines if line.endswith("s)")]
    assert starts == ends == ["resolve", "optimize", "forms", "variants", "parity", "report", "commit"], proc.stderr
    assert len(lines) == 2 * len(starts), proc.stderr


def test_an_mlflow_source_without_tracking_uri_gets_a_hint_and_no_stray_database(tmp_path):
    import subprocess

    from test_cli import MLSTEP

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    for args in (["optimize", "models:/minilm@candidate", "-o", tmp_path / "o"],
                 ["benchmark", "models:/minilm@candidate"], ["promote", "models:/minilm/1", "--alias", "champion"]):
        proc = subprocess.run(MLSTEP + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=tmp_path)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "models:/minilm" in lines[0] and "MLFLOW_TRACKING_URI is not set" in lines[0], lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
