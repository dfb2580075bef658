"""The pytest-benchmark latency gates: the rule, the run (real ORT sessions), the step and the CLI flags.

Timing luck is never relied on: a variant that fails is made truly slower (a chain of 160 MatMuls against one, many times
the work of the baseline), and an identical copy is gated with a slowdown allowance (3x) that noise on a
shared 2-core machine does not reach.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlstep import gates as verdicts
from mlstep.bench.gates import BASELINE, GateSettings, require_cuda, run_gates, shaped_feeds
from mlstep.errors import BadInputError, GateFailedError
from mlstep.export import ExportSpec
from mlstep.optimizer import io as model_io
from test_cli import mlstep

FAST = dict(warmup=1, repeat=6)
PNG = b"\x89PNG\r\n\x1a\n"


def chain_model(path: Path, matmuls: int, dim: int = 64) -> Path:
    """y = x @ W1 @ W2 ... (``matmuls`` MatMuls); the same signature whatever the length."""
    rng = np.random.default_rng(0)
    weights, nodes, prev = [], [], "x"
    for i in range(matmuls):
        weights.append(numpy_helper.from_array((rng.standard_normal((dim, dim)) / dim).astype(np.float32), f"W{i}"))
        out = "y" if i == matmuls - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def cuda_loads() -> bool:
    try:
        require_cuda()
    except BadInputError:
        return False
    return True


# ------------------------------------------------------------------------------------------- the rule

def test_the_rule_is_decided_in_mlstep_gates():
    """The run only measures; mlstep.gates decides (its rule is tested on recorded samples in test_verdicts)."""
    assert not hasattr(__import__("mlstep.bench.gates", fromlist=["x"]), "decide")
    assert verdicts.decide_latency([[1.0]] * 4, [[1.0]] * 4, 0.05).state == "passed"


def test_settings_are_checked():
    from mlstep.errors import UsageError

    for bad in (dict(max_slowdown=-0.1), dict(min_speedup=0.0), dict(repeat=0), dict(warmup=-1),
                dict(batch_size=0), dict(past_sequence_length=-1), dict(remeasure=-1)):
        with pytest.raises(UsageError):
            GateSettings(**bad).checked()
    assert GateSettings(repeat=3).checked().blocks == 3        # never more blocks than rounds


# -------------------------------------------------------------------------------------------- the run

def test_slower_variant_fails_identical_copy_passes(tmp_path, monkeypatch):
    base = chain_model(tmp_path / "models" / "base.onnx", 1)
    slow = chain_model(tmp_path / "models" / "slow.onnx", 160)
    same = tmp_path / "models" / "same.onnx"
    shutil.copy(base, same)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    environ = dict(os.environ)

    results = run_gates(base, {"same": same, "slow": slow}, GateSettings(max_slowdown=2.0, **FAST),
                        output_dir=tmp_path / "gates")

    assert results.variants["same"].passed, results.variants["same"]
    assert not results.variants["slow"].passed and "max slowdown 2" in results.variants["slow"].reason
    # The interval, not one median, decided; a borderline first run would have been re-measured (pooled).
    assert results.variants["slow"].ratio_low > 3.0 and results.variants["slow"].blocks == 6 * results.measurements
    assert not results.passed and results.failures() == [f"slow: {results.variants['slow'].reason}"]
    assert results.variants["slow"].speedup < 1 / 3
    assert results.provider == "CPUExecutionProvider" and not results.io_binding and results.threads >= 1
    assert results.variants["slow"].rounds >= 6 and results.iterations >= 1
    # pytest-benchmark's own JSON: one case per (model, block), interleaved, per-round data included.
    data = json.loads(results.json_path.read_text())
    assert results.json_path == tmp_path / "gates" / "benchmark.json"
    assert {"machine_info", "benchmarks", "version"} <= set(data)
    names = [b["name"] for b in data["benchmarks"]]
    assert "test_latency[baseline-block0]" in names and "test_latency[slow-block5]" in names
    assert all(b["group"] == "mlstep-gates" and b["stats"]["data"] for b in data["benchmarks"])
    assert {b["extra_info"]["model"] for b in data["benchmarks"]} == {BASELINE, "same", "slow"}
    summary = json.loads(results.summary_path.read_text())
    assert summary["variants"]["slow"]["passed"] is False and summary["provider"] == "CPUExecutionProvider"
    assert results.plot_path.read_bytes().startswith(PNG)
    assert set(results.metrics()) >= {"latency.baseline.median_ms", "latency.slow.speedup", "latency.same.passed"}
    # pytest left nothing behind: no cache, no .benchmarks storage, no env changes.
    assert list(cwd.iterdir()) == []
    assert dict(os.environ) == environ

    moved = results.moved(tmp_path, tmp_path / "elsewhere")
    assert moved.json_path == tmp_path / "elsewhere" / "gates" / "benchmark.json"


def test_a_model_that_cannot_run_is_one_error(tmp_path):
    base = chain_model(tmp_path / "base.onnx", 1)
    other = chain_model(tmp_path / "other.onnx", 1, dim=32)      # x is [batch, 32]: the feeds do not fit
    from mlstep.errors import MlstepError

    with pytest.raises(MlstepError, match="benchmark run failed"):
        run_gates(base, {"fp32": other}, GateSettings(**FAST), output_dir=tmp_path / "g")


def test_past_models_are_timed_with_one_new_token(tmp_path):
    f = TensorProto.FLOAT
    path = tmp_path / "past.onnx"
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["past_key_values.0.key"], ["y"], keepdims=0)], "past",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("past_key_values.0.key", f, ["batch", 2, "past_sequence", 4])],
        [helper.make_tensor_value_info("y", f, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    feeds, shape = shaped_feeds(model_io.load(path), batch=3, sequence=16)
    assert shape == {"batch_size": 3, "sequence_length": 1, "past_sequence_length": 16}
    assert feeds["input_ids"].shape == (3, 1) and feeds["attention_mask"].shape == (3, 17)
    assert feeds["past_key_values.0.key"].shape == (3, 2, 16, 4)
    assert shaped_feeds(model_io.load(path), 1, 16, past=5)[1]["past_sequence_length"] == 5


@pytest.mark.skipif(cuda_loads(), reason="CUDA loads here: the CPU-only refusal cannot be shown")
def test_require_gpu_refuses_the_cpu(tmp_path):
    base = chain_model(tmp_path / "base.onnx", 1)
    with pytest.raises(BadInputError, match="require-gpu") as info:
        run_gates(base, {"fp32": base}, GateSettings(require_gpu=True, **FAST), output_dir=tmp_path / "g")
    assert info.value.exit_code == 2
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------------------------- the step and CLI

def test_step_records_the_latency_gate(exported, tmp_path):
    from mlstep import step

    source = exported(ExportSpec("bert"))
    settings = step.StepSettings(precisions=("fp32",), validate=False, max_slowdown=1.0, **FAST)
    result = step.run(source, tmp_path / "ok", settings=settings)
    fp32 = result.report["variants"]["fp32"]
    assert (fp32["gate"]["parity"], fp32["gate"]["latency"], fp32["gate"]["passed"]) == ("skipped", "passed", True), fp32
    low, high = fp32["latency_ms"]["speedup_interval"]
    assert low <= fp32["latency_ms"]["speedup"] <= high
    assert result.passed and result.gates.variants["fp32"].passed
    assert result.gates.json_path == tmp_path / "ok" / "latency" / "benchmark.json"
    assert result.gates.json_path.is_file() and result.gates.plot_path.is_file()
    assert result.report["options"]["max_slowdown"] == 1.0 and result.report["options"]["repeat"] == 6

    # An unreachable speedup fails the gate: the report says so, check() raises GateFailedError (exit 1).
    settings = step.StepSettings(precisions=("fp32",), validate=False, min_speedup=1000.0, **FAST)
    result = step.run(source, tmp_path / "bad", settings=settings)
    fp32 = result.report["variants"]["fp32"]
    assert fp32["gate"]["latency"] == "failed" and fp32["gate"]["passed"] is False and not result.passed
    saved = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert saved["variants"]["fp32"]["gate"]["latency"] == "failed"
    with pytest.raises(GateFailedError) as info:
        result.check()
    assert info.value.exit_code == 1 and "fp32 latency" in str(info.value)


def test_a_failed_parity_is_not_undone_by_a_passed_latency():
    class Gate:
        passed, gated, reason = True, True, ""

    coverage = verdicts.Verdict("coverage", "passed")
    parity = verdicts.Verdict("parity", "failed", "max |diff| 1e-01 on 'y'")
    got = verdicts.VariantVerdicts(parity, verdicts.latency_verdict(Gate()), coverage)
    assert got.latency.state == "passed" and not got.passed
    assert got.failures("fp16") == ["fp16 parity (max |diff| 1e-01 on 'y')"]


def test_cli_gate_flags(exported, tmp_path):
    source = exported(ExportSpec("bert"))
    out = tmp_path / "out"
    proc = mlstep("optimize", source, "-o", out, "-p", "fp32", "--skip-validation", "--min-speedup", "1000",
                  "--max-slowdown", "0.5", "--warmup", "1", "--repeat", "4")
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "fp32 latency" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["variants"]["fp32"]["gate"]["latency"] == "failed"
    assert {report["options"][k] for k in ("max_slowdown", "min_speedup", "warmup", "repeat")} == {0.5, 1000.0, 1, 4}
    assert (out / "latency" / "benchmark.json").is_file()

    if not cuda_loads():
        proc = mlstep("optimize", source, "-o", tmp_path / "gpu", "--require-gpu")
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "require-gpu" in proc.stderr and not (tmp_path / "gpu").exists()


def test_fp16_on_the_cpu_is_timed_but_not_gated_unless_asked(tmp_path):
    """fp16 is the GPU variant: on the CPU a slow fp16 is reported ("not_gated"), not failed, by default."""
    base = chain_model(tmp_path / "models" / "base.onnx", 1)
    slow = chain_model(tmp_path / "models" / "fp16.onnx", 160)
    results = run_gates(base, {"fp16": slow}, GateSettings(max_slowdown=2.0, **FAST), output_dir=tmp_path / "a")
    gate = results.variants["fp16"]
    assert gate.passed and not gate.gated and "not gated" in gate.reason and gate.speedup < 1 / 3
    assert verdicts.latency_verdict(gate).state == "not_gated"
    strict = run_gates(base, {"fp16": slow}, GateSettings(max_slowdown=2.0, gate_fp16_on_cpu=True, **FAST),
                       output_dir=tmp_path / "b")
    assert not strict.variants["fp16"].passed and strict.variants["fp16"].gated
