"""The coverage gate through the step: detected blocks that stay unfused fail the run (exit 1, nothing
registered) unless --allow-partial-fusion; a graph with no transformer block fails as "nothing found to fuse".

The optimizer fills ``OptimizeResult.coverage``; where a test needs a precise coverage it wraps the real
optimizer and replaces only that field with constructed ``BlockCoverage`` values (the step under test is
real: real export, real variants, real parity, a real ``mlflow server``).
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from mlstep import step
from mlstep.errors import GateFailedError
from mlstep.export import ExportSpec
from mlstep.optimizer import OptimizeOptions, optimize_file
from mlstep.optimizer.coverage import BlockCoverage
from test_cli import mlstep

BERT = ExportSpec("bert")
QUICK = step.StepSettings(precisions=("fp32",), benchmark=False)
ATTENTION_MISSED = {"attention": BlockCoverage("attention", 2, 0, ("layer 0: the scale is not a constant",
                                                                    "layer 1: the scale is not a constant")),
                    "skip_layer_norm": BlockCoverage("skip_layer_norm", 4, 4)}
NOTHING = {kind: BlockCoverage(kind, 0, 0) for kind in ("attention", "embedding", "skip_layer_norm")}


@pytest.fixture
def coverage_is(monkeypatch):
    """coverage_is(values): the real optimizer runs; its result reports ``values`` as coverage."""
    def use(values):
        real = step._optimize

        def optimize(*args, **kwargs):
            return dataclasses.replace(real(*args, **kwargs), coverage=dict(values))

        monkeypatch.setattr(step, "_optimize", optimize)
    return use


def test_an_unfused_detected_block_fails_the_gate_and_is_reported(exported, tmp_path, coverage_is):
    coverage_is(ATTENTION_MISSED)
    result = step.run(exported(BERT), tmp_path / "out", settings=QUICK)
    assert not result.passed and result.verdicts["fp32"].parity.state == "passed"
    assert result.warnings == ["attention 0/2 fused: layer 0: the scale is not a constant; "
                               "layer 1: the scale is not a constant"]
    with pytest.raises(GateFailedError, match=r"coverage \(attention 0/2: layer 0: the scale is not a constant") as info:
        result.check()
    assert info.value.exit_code == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["coverage"]["state"] == "failed"
    assert report["coverage"]["blocks"]["attention"] == {"detected": 2, "fused": 0, "misses": [
        "layer 0: the scale is not a constant", "layer 1: the scale is not a constant"]}
    assert report["variants"]["fp32"]["gate"]["coverage"] == "failed"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Coverage" in markdown and "| attention | 0/2 | layer 0: the scale is not a constant" in markdown

    allowed = step.run(exported(BERT), tmp_path / "ok", settings=dataclasses.replace(QUICK, allow_partial_fusion=True))
    assert allowed.passed and allowed.warnings and allowed.verdicts["fp32"].coverage.state == "passed"


def test_nothing_found_to_fuse_fails_even_with_partial_allowed(exported, tmp_path, coverage_is):
    coverage_is(NOTHING)
    result = step.run(exported(BERT), tmp_path / "out", settings=dataclasses.replace(QUICK, allow_partial_fusion=True))
    with pytest.raises(GateFailedError, match="nothing found to fuse"):
        result.check()


def test_a_coverage_failure_registers_nothing(exported, tmp_path, coverage_is, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    coverage_is(ATTENTION_MISSED)
    result = step.run(exported(BERT), tmp_path / "out", settings=QUICK,
                      publish=step.PublishSettings(register_as="coverage-gated"))
    assert not result.passed
    assert result.report["mlflow"]["registrations"]["fp32"]["status"] == "skipped"
    assert result.report["variants"]["fp32"]["registered"] is None
    assert MlflowClient(mlflow_server).search_model_versions("name='coverage-gated'") == []


def test_disabling_attention_on_a_real_model_fails_the_gate_via_the_cli(exported, tmp_path):
    """End to end with the optimizer's own coverage (active once the optimizer fills it)."""
    source = exported(BERT)
    if not optimize_file(source, OptimizeOptions(disabled_fusions=frozenset({"attention"}))).coverage:
        pytest.skip("the optimizer does not report block coverage on this branch")
    out = tmp_path / "out"
    proc = mlstep("optimize", source, "-o", out, "-p", "fp32", "--skip-benchmark", "--disable-fusion", "attention")
    assert proc.returncode == 1, proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("mlstep: warning: unfused attention 0/2 fused: layer 0: "), proc.stderr
    assert lines[-1].startswith("mlstep: error: gate failed: coverage (attention 0/2: layer 0: ")
    report = json.loads((out / "report.json").read_text())
    assert report["coverage"]["blocks"]["attention"]["detected"] == 2
    allowed = mlstep("optimize", source, "-o", tmp_path / "ok", "-p", "fp32", "--skip-benchmark",
                     "--disable-fusion", "attention", "--allow-partial-fusion")
    assert allowed.returncode == 0 and "warning: unfused attention" in allowed.stderr, allowed.stderr
