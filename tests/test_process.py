"""Process hygiene: signals, the output guard at commit, the embedded store, bad input, the variant load check.

Tests wait on events, never on time: a signal is sent when the stage marker (``mlstep: latency ...``, printed
with ``--verbose`` when a stage starts) is read from the process's stderr, with a latency stage long enough
(thousands of rounds) that it cannot finish first; in-process tests act from the step's own listener.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from mlstep import outdir, step
from mlstep.errors import Interrupted, OutputError, UsageError, VariantLoadError
from mlstep.export import ExportSpec
from test_cli import MLSTEP, assert_bad_input, mlstep

BERT = ExportSpec("bert")
QUICK = ("-p", "fp32", "--skip-benchmark")


def leftovers(folder: Path, prefix: str = "mlstep-") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if prefix in p.name) if folder.is_dir() else []


# -------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig,code,stage", [(signal.SIGINT, 130, "latency"), (signal.SIGTERM, 143, "latency"),
                                            (signal.SIGHUP, 129, "parity")],
                         ids=["SIGINT-latency", "SIGTERM-latency", "SIGHUP-parity"])
def test_a_signal_cleans_up_and_exits_128_plus_its_number(exported, tmp_path, sig, code, stage):
    source = exported(BERT)
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLSTEP_DEBUG"} | {"TMPDIR": str(tmp)}
    # --form fused: the forms stage's timing is not the subject (it runs before the stages signalled here)
    args = ["optimize", str(source), "-o", str(out), "-v", "--warmup", "1", "--repeat", "5000", "--form", "fused"]
    proc = subprocess.Popen(MLSTEP + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:                      # the event: the stage has started
        seen.append(line)
        if line.startswith(f"mlstep: {stage} ..."):
            proc.send_signal(sig)
            break
    stdout, rest = proc.communicate(timeout=600)
    stderr = "".join(seen) + rest
    assert proc.returncode == code, stderr
    assert stderr.splitlines()[-1] == f"mlstep: error: interrupted ({signal.Signals(sig).name})", stderr
    assert "Traceback" not in stderr and "pytest exit" not in stderr
    assert not out.exists() and leftovers(tmp_path, ".out.") == []
    assert leftovers(tmp) == []                   # the gates' work folder, the source download: all removed


def test_a_signal_from_inside_a_stage_in_process(exported, tmp_path):
    """The library: SIGTERM raised in the latency stage -> ``Interrupted`` (exit 143), staging removed."""
    class KillAt:
        def start(self, stage, detail=""):
            if stage == "latency":
                os.kill(os.getpid(), signal.SIGTERM)

        def done(self, stage, seconds, detail=""):
            pass

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        step.run(exported(BERT), tmp_path / "out", settings=step.StepSettings(precisions=("fp32",), warmup=1,
                                                                               repeat=4, form="fused"),
                 listener=KillAt())
    assert info.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is previous
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ the output guard

def test_a_folder_that_appears_at_the_output_during_the_run_is_kept(exported, tmp_path):
    out = tmp_path / "out"

    class Intruder:
        def start(self, stage, detail=""):
            if stage == "parity":                 # someone else writes there while the run works
                out.mkdir()
                (out / "theirs.txt").write_text("not mlstep's")

        def done(self, stage, seconds, detail=""):
            pass

    with pytest.raises(OutputError, match="appeared while the run was working") as info:
        step.run(exported(BERT), out, settings=step.StepSettings(precisions=("fp32",), benchmark=False),
                 listener=Intruder())
    assert info.value.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "not mlstep's"
    assert leftovers(tmp_path, ".out.") == []


def test_an_earlier_output_swapped_during_the_run_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(OutputError, match="replaced by another folder"):
        with outdir.staged_output(out) as staging:
            (staging / "report.json").write_text("{}")
            out.rename(tmp_path / "moved")
            out.mkdir()
            (out / "precious").write_text("keep")
    assert (out / "precious").read_text() == "keep" and (tmp_path / "moved" / "report.json").is_file()
    assert leftovers(tmp_path, ".out.") == []


def test_names_longer_than_255_bytes_are_refused_and_a_250_byte_name_works(exported, tmp_path):
    long = tmp_path / ("a" * 256)
    assert_bad_input(mlstep("optimize", exported(BERT), "-o", long, *QUICK), tmp_path / "x", "256 bytes")
    source = tmp_path / ("s" * 300 + ".onnx")
    assert_bad_input(mlstep("optimize", source, "-o", tmp_path / "o", *QUICK), tmp_path / "o", "source", "305 bytes")
    legal = tmp_path / ("b" * 250)
    proc = mlstep("optimize", exported(BERT), "-o", legal, *QUICK, "--allow-partial-fusion")
    assert proc.returncode == 0, proc.stderr
    assert (legal / "fp32" / "model.onnx").is_file() and leftovers(tmp_path, ".b") == []
    with pytest.raises(UsageError):
        outdir.check_names(tmp_path / ("é" * 128), "--output")       # 256 bytes in UTF-8


# ------------------------------------------------------------------------------------ the embedded store

def test_the_embedded_store_never_lives_in_the_output_folder(exported, tmp_path):
    env = {"MLFLOW_TRACKING_URI": ""}
    work = tmp_path / "project"
    work.mkdir()
    proc = subprocess.run(MLSTEP + ["optimize", str(exported(BERT)), "-o", ".", *QUICK, "--register-as", "m"],
                          cwd=work, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "MLflow store" in proc.stderr and "inside the output folder" in proc.stderr
    assert sorted(p.name for p in work.iterdir()) == []            # nothing written: no mlflow.db, no mlruns
    # An earlier mlstep output that holds the store: refused, the store kept.
    (work / "report.json").write_text("{}")
    (work / "mlflow.db").write_bytes(b"SQLite format 3\x00")
    proc = subprocess.run(MLSTEP + ["optimize", str(exported(BERT)), "-o", ".", *QUICK, "--register-as", "m"],
                          cwd=work, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | env)
    assert proc.returncode == 2 and "inside the output folder" in proc.stderr, proc.stderr
    assert (work / "mlflow.db").read_bytes() == b"SQLite format 3\x00"


def test_store_paths_are_read_from_the_tracking_uri(tmp_path):
    assert outdir.local_store_paths("sqlite:////abs/m.db", tmp_path) == [Path("/abs/m.db"), tmp_path / "mlruns"]
    assert outdir.local_store_paths("sqlite:///rel.db", tmp_path) == [tmp_path / "rel.db", tmp_path / "mlruns"]
    assert outdir.local_store_paths("file:///x/mlruns", tmp_path) == [Path("/x/mlruns")]
    assert outdir.local_store_paths("http://127.0.0.1:5000", tmp_path) == []
    with pytest.raises(UsageError):
        outdir.check_store_outside(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    outdir.check_store_outside(tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db")


# ------------------------------------------------------------------------------------------- bad input

def test_a_model_onnx_runtime_refuses_is_one_line_and_nothing_written(tmp_path):
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", f, ["batch", 4])],
                              [helper.make_tensor_value_info("y", f, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    source = tmp_path / "unknown-op.onnx"
    source.write_bytes(model.SerializeToString())
    proc = mlstep("optimize", source, "-o", tmp_path / "out", "--skip-validation", "--skip-benchmark")
    assert_bad_input(proc, tmp_path / "out", "ONNX Runtime cannot load it", "NoSuchOp")


@pytest.mark.parametrize("where", ["constant", "if"])
def test_external_data_escaping_through_a_constant_or_a_subgraph(tmp_path, where):
    import numpy as np
    from onnx import numpy_helper

    def escaping(name, shape):
        t = numpy_helper.from_array(np.zeros(shape, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", str(4 * int(np.prod(shape))))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    f = TensorProto.FLOAT
    if where == "constant":
        nodes = [helper.make_node("Constant", [], ["W"], value=escaping("W", (4, 4))),
                 helper.make_node("MatMul", ["x", "W"], ["y"])]
        inputs = [helper.make_tensor_value_info("x", f, ["batch", 4])]
    else:
        then = helper.make_graph([helper.make_node("Identity", ["W"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", f, [4])], [escaping("W", (4,))])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", f, [4])])
        nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
        inputs = [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", f, [4])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", f, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    source = tmp_path / "a" / "b" / "model.onnx"
    source.parent.mkdir(parents=True)
    source.write_bytes(model.SerializeToString())
    assert_bad_input(mlstep("optimize", source, "-o", tmp_path / "out"), tmp_path / "out", "escapes")


# -------------------------------------------------------------------------------- the variant load check

def test_a_written_variant_that_does_not_load_is_exit_3_and_kept_aside(exported, tmp_path, monkeypatch):
    """Even with --skip-validation every written variant is loaded in ONNX Runtime. A converter bug is
    simulated by a to_fp16 that emits an op ORT does not know."""
    from mlstep import precision

    real = precision.to_fp16

    def broken(model, **kwargs):
        out = real(model, **kwargs)
        first = out.graph.node(0)
        out.graph.insert_after(first, ir.Node("", "NoSuchOp", [first.outputs[0]]))
        return out

    monkeypatch.setattr(precision, "to_fp16", broken)
    with pytest.raises(VariantLoadError) as info:
        step.run(exported(BERT), tmp_path / "out", settings=step.StepSettings(validate=False, benchmark=False))
    assert info.value.exit_code == 3 and "the fp16 variant" in str(info.value) and "NoSuchOp" in str(info.value)
    kept = Path(str(info.value).rsplit(" at ", 1)[1])
    assert (kept / "model.onnx").is_file()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, ".out.") == []
    json.dumps(str(info.value))
