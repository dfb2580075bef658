"""The ``mlstep`` command line, run as users run it: the installed console script in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from mlstep.export import ExportSpec
from conftest import cancellation_model

_SCRIPT = Path(sys.executable).parent / "mlstep"
MLSTEP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c", "from mlstep.cli.main import app; app()"]

REPORT_KEYS = {"source", "model_type", "num_heads", "hidden_size", "options", "optimizer_seconds", "mlflow",
               "coverage", "notes", "runtime", "forms", "variants"}
VARIANT_KEYS = {"path", "fusions", "parity", "latency_ms", "gate", "registered", "precision"}


def mlstep(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MLSTEP_DEBUG"} | (env or {})
    return subprocess.run(MLSTEP + [str(a) for a in args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def assert_bad_input(proc: subprocess.CompletedProcess, output: Path, *needles: str) -> None:
    """Exit 2, exactly one line on stderr, no traceback, and nothing left where the output would go."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mlstep: error: "), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not output.exists()
    if output.parent.is_dir():
        leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.mlstep-")]
        assert not leftovers, leftovers


def tiny_model(path: Path, *, external_location: str | None = None) -> Path:
    """y = x @ W + b: a valid model with nothing to fuse (optionally W as external data at a location)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    if external_location is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external_location), ("offset", "0"), ("length", "64")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


# ------------------------------------------------------------------------------------------------ help

def test_help_lists_commands():
    proc = mlstep("--help")
    assert proc.returncode == 0, proc.stderr
    assert "optimize" in proc.stdout and "Exit codes" in proc.stdout


def test_optimize_help_lists_every_flag():
    proc = mlstep("optimize", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--output", "--precision", "--skip-validation", "--skip-benchmark", "--model-type",
                 "--num-heads", "--hidden-size", "--input-int32", "--use-gpu", "--opt-level", "--verbose",
                 "--disable-fusion", "--batch-size", "--sequence-length", "--exact-padding"):
        assert flag in proc.stdout, flag


def test_version():
    proc = mlstep("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("mlstep ")


# ------------------------------------------------------------------------------------------- bad input

def test_not_onnx(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_text("this is not a model\n" * 20)
    assert_bad_input(mlstep("optimize", source, "-o", tmp_path / "out"), tmp_path / "out", "model.onnx")


def test_truncated_onnx(tmp_path):
    whole = tiny_model(tmp_path / "whole.onnx").read_bytes()
    source = tmp_path / "truncated.onnx"
    source.write_bytes(whole[: len(whole) // 2])
    assert_bad_input(mlstep("optimize", source, "-o", tmp_path / "out"), tmp_path / "out", "truncated.onnx")


def test_missing_source(tmp_path):
    assert_bad_input(mlstep("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "out"), tmp_path / "out",
                     "no such file")


def test_unknown_model_type(tmp_path):
    source = tiny_model(tmp_path / "m.onnx")
    assert_bad_input(mlstep("optimize", source, "-o", tmp_path / "out", "--model-type", "t5"), tmp_path / "out",
                     "t5")


def test_num_heads_not_dividing_hidden_size(tmp_path):
    source = tiny_model(tmp_path / "m.onnx")
    proc = mlstep("optimize", source, "-o", tmp_path / "out", "--num-heads", "5", "--hidden-size", "32")
    assert_bad_input(proc, tmp_path / "out", "does not divide")


def test_external_data_escaping_model_folder(tmp_path):
    source = tiny_model(tmp_path / "a" / "b" / "model.onnx", external_location="../../etc/passwd")
    assert_bad_input(mlstep("optimize", source, "-o", tmp_path / "out"), tmp_path / "out", "escapes")


def test_output_under_a_regular_file(tmp_path):
    source = tiny_model(tmp_path / "m.onnx")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    output = blocker / "out"
    assert_bad_input(mlstep("optimize", source, "-o", output), output, "not a directory")
    assert blocker.read_text() == "x"


def test_output_missing_parents_are_not_left_behind(tmp_path):
    output = tmp_path / "new" / "deeper" / "out"
    source = tmp_path / "model.onnx"
    source.write_text("not onnx")
    assert_bad_input(mlstep("optimize", source, "-o", output), output)
    assert not (tmp_path / "new").exists()


def test_foreign_non_empty_output_is_refused_and_kept(tmp_path):
    source = tiny_model(tmp_path / "m.onnx")
    output = tmp_path / "mine"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    proc = mlstep("optimize", source, "-o", output)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "refusing" in proc.stderr and (output / "precious.txt").read_text() == "keep me"


def test_source_inside_output_is_refused(tmp_path):
    output = tmp_path / "out"
    source = tiny_model(output / "fp32" / "model.onnx")
    (output / "report.json").write_text("{}")
    proc = mlstep("optimize", source, "-o", output)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "inside the output folder" in proc.stderr and source.is_file()


def test_malformed_mlflow_uri(tmp_path):
    # Refused on its shape, before any MLflow store is touched (registry behaviour: tests/test_registry.py).
    proc = mlstep("optimize", "models:/bert", "-o", tmp_path / "out")
    assert_bad_input(proc, tmp_path / "out", "models:/NAME/VERSION")


def test_credentials_never_printed(tmp_path):
    proc = mlstep("optimize", "https://alice:s3cret@example.com/m.onnx", "-o", tmp_path / "out")
    assert_bad_input(proc, tmp_path / "out")
    assert "s3cret" not in proc.stderr and "alice" not in proc.stderr


def test_missing_output_flag_is_one_line(tmp_path):
    proc = mlstep("optimize", tiny_model(tmp_path / "m.onnx"))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "--output" in proc.stderr


def test_debug_variable_shows_traceback(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_text("not onnx")
    proc = mlstep("optimize", source, "-o", tmp_path / "out", env={"MLSTEP_DEBUG": "1"})
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("mlstep: error: ")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ happy paths

def read_report(output: Path) -> dict:
    report = json.loads((output / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    for name, variant in report["variants"].items():
        assert set(variant) == VARIANT_KEYS, name
        assert (output / variant["path"]).is_file()
        assert set(variant["parity"]) == {"max_abs_diff", "passed", "worst_output", "worst_case", "cases"}
        assert set(variant["latency_ms"]) == {"median", "p90", "p95", "baseline_median", "speedup", "speedup_interval"}
        assert set(variant["gate"]) == {"parity", "latency", "coverage", "passed", "reasons"}
        assert variant["registered"] is None
    return report


def test_optimize_bert_writes_the_contract_layout(exported, tmp_path):
    source = exported(ExportSpec("bert"))
    output = tmp_path / "out"
    # The layout is the point here, not speed: a generous gate keeps a loaded CI machine from flaking it.
    proc = mlstep("optimize", source, "--output", output, "--max-slowdown", "1.0")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert sorted(p.name for p in output.iterdir()) == ["fp16", "fp32", "latency", "report.json", "report.md"]
    assert {p.name for p in (output / "latency").iterdir()} >= {"benchmark.json", "gates.json"}
    assert (output / "fp32" / "model.onnx").is_file() and (output / "fp16" / "model.onnx").is_file()
    report = read_report(output)
    assert report["model_type"] == "bert" and report["num_heads"] == 4 and report["hidden_size"] == 32
    assert report["options"]["precision"] == ["fp32", "fp16"]
    for name in ("fp32", "fp16"):
        variant = report["variants"][name]
        assert variant["path"] == f"{name}/model.onnx"
        assert variant["fusions"], name
        assert variant["parity"]["passed"] is True and variant["gate"]["passed"] is True
        assert variant["latency_ms"]["median"] > 0 and variant["latency_ms"]["speedup"] > 0
    assert "fp16" in proc.stdout and "passed" in proc.stdout
    markdown = (output / "report.md").read_text()
    assert "## Fusions" in markdown and "## Parity" in markdown and "## Latency" in markdown
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.mlstep-")]

    # A second run replaces the earlier output (and only on success).
    proc = mlstep("optimize", source, "-o", output, "--precision", "fp32", "--skip-benchmark")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in output.iterdir()) == ["fp32", "report.json", "report.md"]
    report = read_report(output)
    assert list(report["variants"]) == ["fp32"]
    assert report["variants"]["fp32"]["latency_ms"]["median"] is None
    assert report["variants"]["fp32"]["gate"]["latency"] == "skipped"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.mlstep-")]


def test_nothing_to_fuse_still_gets_variants_and_is_not_passed_as_optimized(tmp_path):
    from mlstep.optimizer import optimize_file

    source = tiny_model(tmp_path / "m.onnx")
    output = tmp_path / "out"
    proc = mlstep("optimize", source, "-o", output, "--verbose", "--skip-benchmark")
    assert "no fusions applied" in proc.stdout
    report = read_report(output)
    assert set(report["variants"]) == {"fp32", "fp16"}
    assert all(v["fusions"] == {} for v in report["variants"].values())
    assert "No fusions applied" in (output / "report.md").read_text()
    if optimize_file(source).coverage:      # the optimizer reports what it detected: nothing -> the gate fails
        assert proc.returncode == 1, proc.stderr + proc.stdout
        assert proc.stderr.splitlines()[-1].startswith("mlstep: error: gate failed: coverage (nothing found to fuse")
        assert report["coverage"]["state"] == "failed"
    else:                                   # no coverage reported: the gate is not_gated, the step passes
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert report["coverage"]["state"] == "not_gated"


def test_failed_gate_exits_1_and_still_writes_the_report(tmp_path):
    source = cancellation_model(tmp_path / "cancel.onnx")
    output = tmp_path / "out"
    proc = mlstep("optimize", source, "-o", output, "--skip-benchmark")
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "fp16 parity" in proc.stderr
    report = read_report(output)
    assert report["variants"]["fp32"]["gate"]["passed"] is True
    fp16 = report["variants"]["fp16"]
    assert fp16["parity"]["passed"] is False and fp16["parity"]["worst_output"] == "y"
    assert (fp16["gate"]["parity"], fp16["gate"]["latency"], fp16["gate"]["passed"]) == ("failed", "skipped", False)
    assert "max |diff|" in fp16["gate"]["reasons"]["parity"] and fp16["parity"]["worst_case"] in fp16["parity"]["cases"]
    assert "a gate failed" in (output / "report.md").read_text()


def test_mlflow_model_directory_source(tmp_path):
    model_dir = tmp_path / "mlflow_model"
    model_dir.mkdir()
    cancellation_model(model_dir / "model.onnx")     # a LayerNorm block to fuse: the coverage gate passes
    (model_dir / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n    onnx_version: 1.17.0\n")
    output = tmp_path / "out"
    proc = mlstep("optimize", model_dir, "-o", output, "-p", "fp32", "--skip-validation", "--skip-benchmark")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = read_report(output)
    assert report["source"].endswith("model.onnx")
    gate = report["variants"]["fp32"]["gate"]
    assert (gate["parity"], gate["latency"], gate["passed"]) == ("skipped", "skipped", True)


def test_an_fp16_source_gets_no_fake_fp32_variant(exported, tmp_path):
    """Variants are named by what they are: an fp16 source's optimized graph is the fp16 variant (fp16
    tolerances); asking only for fp32 is a usage error."""
    import onnx_ir as ir

    from mlstep.precision import to_fp16

    source = tmp_path / "bert-fp16.onnx"
    ir.save(to_fp16(ir.load(exported(ExportSpec("bert")))), source)
    output = tmp_path / "out"
    proc = mlstep("optimize", source, "-o", output, "--skip-benchmark", "--allow-partial-fusion")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = read_report(output)
    assert list(report["variants"]) == ["fp16"] and not (output / "fp32").exists()
    assert report["variants"]["fp16"]["parity"]["passed"] is True
    assert any("no fp32 variant" in note for note in report["notes"])
    proc = mlstep("optimize", source, "-o", tmp_path / "only32", "-p", "fp32", "--skip-benchmark")
    assert_bad_input(proc, tmp_path / "only32", "already float16", "--precision fp16")
