"""``mlstep export`` keeps the task head that config.json's ``architectures`` names, and ``mlstep optimize``
fuses the encoder under it: a saved BertForSequenceClassification folder (its own weights, dynamo) and a
RobertaForQuestionAnswering config JSON (TorchScript), each exported -> checked against torch on right- and
left-padded batches -> optimized fully fused with parity. Heads mlstep does not export are refused in one line."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_cli import MLSTEP, mlstep
from test_export_cli import assert_one_line_exit_2, dims, write_config

from mlstep.export import TINY

LAYERS = TINY["num_hidden_layers"]


def padded_batches(vocab: int = 50) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(2, 7)).astype(np.int64)
    right = np.array([[1] * 7, [1] * 4 + [0] * 3], dtype=np.int64)
    return {"right-padded": {"input_ids": ids, "attention_mask": right},
            "left-padded": {"input_ids": ids, "attention_mask": right[:, ::-1].copy()}}


def optimize_fully_fused(model: str, out) -> dict:
    proc = subprocess.run([*MLSTEP, "optimize", model, "-o", str(out), "--skip-benchmark", "--no-register"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    for variant in ("fp32", "fp16"):
        entry = report["variants"][variant]
        assert entry["fusions"].get("Attention") == LAYERS, entry["fusions"]
        assert entry["fusions"].get("EmbedLayerNormalization") == 1, entry["fusions"]
        assert entry["fusions"].get("SkipLayerNormalization") == 2 * LAYERS, entry["fusions"]
        assert entry["parity"]["passed"], entry["parity"]
        assert {"s8/left-padded", "s8/right-padded", "s64/left-padded"} <= set(entry["parity"]["cases"])
    return report


def test_sequence_classification_folder_keeps_its_head_and_fuses(tmp_path):
    import torch

    from mlstep.export import build_model, tiny_config

    model = build_model(tiny_config("bert", "sdpa", num_labels=3), seed=5,
                        auto_class="AutoModelForSequenceClassification")
    folder = tmp_path / "bert-cls"
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    out = tmp_path / "cls.onnx"
    proc = mlstep("export", folder, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("exported BertForSequenceClassification (weights from the folder")
    assert dims(ir.load(out))["logits"] == ["batch", 3]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for case, feeds in padded_batches().items():
        feeds = feeds | {"token_type_ids": np.zeros_like(feeds["input_ids"])}
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        np.testing.assert_allclose(session.run(["logits"], feeds)[0], expected, atol=1e-4, rtol=1e-3,
                                   err_msg=case)

    report = optimize_fully_fused(str(out), tmp_path / "optimized")
    assert report["variants"]["fp32"]["parity"]["worst_output"] == "logits"


def test_question_answering_config_keeps_both_outputs_and_fuses(tmp_path):
    config = write_config(tmp_path / "qa.json", model_type="roberta", architectures=["RobertaForQuestionAnswering"],
                          **{**TINY, "max_position_embeddings": 70})
    out = tmp_path / "qa.onnx"
    proc = mlstep("export", config, "-o", out, "--exporter", "torchscript")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("exported RobertaForQuestionAnswering (random weights, torchscript")
    shapes = dims(ir.load(out))
    assert [k for k in shapes if k.endswith("logits")] == ["start_logits", "end_logits"]
    assert shapes["start_logits"] == shapes["end_logits"] == ["batch", "sequence"]
    optimize_fully_fused(str(out), tmp_path / "optimized")


@pytest.mark.parametrize("model_type,architecture,kept", [
    ("bert", "BertForPreTraining", "BertForMaskedLM"),
    ("roberta", "RobertaForCausalLM", "RobertaForQuestionAnswering"),
    ("gpt2", "GPT2ForSequenceClassification", "GPT2LMHeadModel, GPT2Model"),
])
def test_a_head_mlstep_does_not_export_is_refused(tmp_path, model_type, architecture, kept):
    fields = dict(n_embd=32, n_layer=1, n_head=4, vocab_size=99) if model_type == "gpt2" else \
        dict(TINY, num_hidden_layers=1, max_position_embeddings=70)
    config = write_config(tmp_path / "c.json", model_type=model_type, architectures=[architecture], **fields)
    out = tmp_path / "out" / "model.onnx"
    assert_one_line_exit_2(mlstep("export", config, "-o", out), out, f"architecture {architecture} is not exported",
                           kept)
