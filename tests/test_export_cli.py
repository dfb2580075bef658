"""``mlstep export`` run as users run it (the console script in a subprocess): a GPT-2 config JSON with past
state that ``mlstep optimize`` then fuses with parity, a local transformers folder whose weights must be the
ones exported, readable dynamic dims, and bad inputs (one line, exit 2)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_cli import MLSTEP, mlstep

from mlstep.export import GPT2_TINY, gpt2_io_names

N_LAYER = GPT2_TINY["n_layer"]


def write_config(path: Path, **fields) -> Path:
    path.write_text(json.dumps(fields))
    return path


def dims(model: ir.Model) -> dict[str, list]:
    return {v.name: [d if isinstance(d, int) else d.value for d in v.shape]
            for v in list(model.graph.inputs) + list(model.graph.outputs)}


@pytest.mark.parametrize("flags,lm_head,with_past", [(["--with-past"], True, True),
                                                      (["--exporter", "torchscript", "--opset", "14", "--no-lm-head",
                                                        "--attention", "eager"], False, False)])
def test_gpt2_config_json_exports_and_optimizes_with_parity(tmp_path, flags, lm_head, with_past):
    config = write_config(tmp_path / "gpt2.json", model_type="gpt2", **GPT2_TINY)
    out = tmp_path / "export" / "model.onnx"
    proc = mlstep("export", config, "--output", out, *flags)
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stdout
    model = ir.load(out)
    inputs, outputs = gpt2_io_names(N_LAYER, with_past, lm_head)
    assert [v.name for v in model.graph.inputs] == inputs
    assert [v.name for v in model.graph.outputs] == outputs
    shapes = dims(model)
    assert shapes["input_ids"] == shapes["position_ids"] == ["batch", "sequence"]
    assert shapes["attention_mask"] == ["batch", "total_sequence" if with_past else "sequence"]
    assert shapes[outputs[0]][:2] == ["batch", "sequence"]   # (TorchScript may leave the hidden dim symbolic)
    if lm_head:
        assert shapes[outputs[0]][2] == GPT2_TINY["vocab_size"]
    for i in range(N_LAYER if with_past else 0):
        assert shapes[f"past_key_{i}"] == shapes[f"past_value_{i}"] == ["batch", 4, "past_sequence", 8]
        assert shapes[f"present_key_{i}"] == shapes[f"present_value_{i}"] == ["batch", 4, "total_sequence", 8]

    result = tmp_path / "optimized"
    proc = subprocess.run([*MLSTEP, "optimize", str(out), "-o", str(result), "--skip-benchmark"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((result / "report.json").read_text())
    assert report["model_type"] == "gpt2"
    for variant in ("fp32", "fp16"):
        entry = report["variants"][variant]
        assert entry["fusions"].get("MultiHeadAttention") == N_LAYER, entry["fusions"]
        assert entry["parity"]["passed"], entry["parity"]


def test_model_folder_exports_its_own_weights(tmp_path):
    """A saved BertModel folder: the export computes what the folder's model computes (not random weights)."""
    import torch

    from mlstep.export import build_model, tiny_config

    model = build_model(tiny_config("bert", "eager"), seed=3)
    folder = tmp_path / "bert-folder"
    model.save_pretrained(folder)
    out = tmp_path / "bert.onnx"
    proc = mlstep("export", folder, "-o", out, "--exporter", "torchscript", "--attention", "eager")
    assert proc.returncode == 0, proc.stderr
    assert "weights from the folder" in proc.stdout
    exported = ir.load(out)
    assert dims(exported) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                              "token_type_ids": ["batch", "sequence"], "last_hidden_state": ["batch", "sequence", 32]}
    ids = np.array([[5, 9, 14, 7, 3, 21], [8, 4, 6, 1, 1, 1]], dtype=np.int64)
    mask = (ids != 1).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, output: Path, *needles: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("mlstep: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not output.exists()


def _bad_sources(tmp: Path) -> dict[str, tuple[Path, list[str], tuple[str, ...]]]:
    (tmp / "no-config").mkdir()
    (tmp / "weights-missing").mkdir()
    write_config(tmp / "weights-missing" / "config.json", model_type="gpt2", **GPT2_TINY)
    (tmp / "broken.json").write_text('{"model_type": "gpt2", "n_embd": 3')
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    write_config(tmp / "t5.json", model_type="t5", architectures=["T5ForConditionalGeneration"])
    write_config(tmp / "untyped.json", hidden_size=32)
    write_config(tmp / "bert.json", model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=64, vocab_size=99)
    write_config(tmp / "gpt2.json", model_type="gpt2", **GPT2_TINY)
    return {
        "missing folder": (tmp / "nowhere", [], ("no such file or folder",)),
        "folder without config.json": (tmp / "no-config", [], ("no config.json",)),
        "folder without weights": (tmp / "weights-missing", [], ("cannot load the model's weights",)),
        "truncated JSON": (tmp / "broken.json", [], ("unreadable config",)),
        "JSON that is not an object": (tmp / "list.json", [], ("unreadable config",)),
        "not text": (tmp / "binary.json", [], ("unreadable config",)),
        "unknown architecture": (tmp / "t5.json", [], ("unsupported architecture", "t5", "gpt2")),
        "no model_type": (tmp / "untyped.json", [], ("unsupported architecture", "no model_type")),
        "--with-past on an encoder": (tmp / "bert.json", ["--with-past"], ("gpt2 only",)),
        "dynamo below opset 18": (tmp / "gpt2.json", ["--opset", "14"], ("opset 14",)),
    }


BAD = ["missing folder", "folder without config.json", "folder without weights", "truncated JSON",
       "JSON that is not an object", "not text", "unknown architecture", "no model_type",
       "--with-past on an encoder", "dynamo below opset 18"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2(tmp_path, case):
    source, flags, needles = _bad_sources(tmp_path)[case]
    out = tmp_path / "out" / "model.onnx"
    assert_one_line_exit_2(mlstep("export", source, "-o", out, *flags), out, *needles)


def test_unknown_exporter_is_a_usage_error(tmp_path):
    out = tmp_path / "model.onnx"
    proc = mlstep("export", tmp_path / "gpt2.json", "-o", out, "--exporter", "tf2onnx")
    assert_one_line_exit_2(proc, out, "--exporter")
