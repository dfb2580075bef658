"""Export transformers models to ONNX the way users do today (TorchScript or dynamo exporter).

Used by tests, benchmarks, examples and ``make demo``; the optimizer itself never imports torch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

ENCODER_FAMILIES = ("bert", "distilbert", "roberta", "albert")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=99, max_position_embeddings=64)


@dataclass(frozen=True)
class ExportSpec:
    family: str                 # bert | distilbert | roberta | albert
    exporter: str = "dynamo"    # dynamo | torchscript
    opset: int = 18
    attention: str = "sdpa"     # sdpa | eager
    token_type_ids: bool = True

    @property
    def key(self) -> str:
        return f"{self.family}-{self.exporter}{self.opset}-{self.attention}" + ("" if self.token_type_ids else "-nott")


def tiny_config(family: str, attention: str = "sdpa", **overrides):
    """A small random-weight transformers config of the given family."""
    import transformers as tf

    kw = dict(TINY)
    if family == "bert":
        cfg = tf.BertConfig(**kw)
    elif family == "roberta":
        cfg = tf.RobertaConfig(**{**kw, "max_position_embeddings": 70})
    elif family == "albert":
        cfg = tf.AlbertConfig(**kw, embedding_size=16)
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=kw["vocab_size"], dim=kw["hidden_size"], n_layers=2, n_heads=4,
                                  hidden_dim=kw["intermediate_size"], max_position_embeddings=64)
    else:
        raise ValueError(f"unknown family {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = attention
    return cfg


def build_model(config, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModel.from_config(config, attn_implementation=config._attn_implementation)
    # Fresh configs start with zero biases and unit LayerNorm scales; perturb every parameter so that a
    # fusion that drops or swaps a bias, a scale or a weight cannot pass parity by accident.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    return model


def export_encoder(model, path: Path, exporter: str = "dynamo", opset: int = 18,
                   token_type_ids: bool = True, external_data: bool = False) -> Path:
    """Export an encoder (BERT-like) with inputs input_ids, attention_mask[, token_type_ids]."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    uses_tt = token_type_ids and model.config.model_type not in ("distilbert",)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_tt else [])
    batch, seq = 2, 8
    ids = torch.randint(0, min(model.config.vocab_size, 50), (batch, seq)) + 3
    args = [ids, torch.ones(batch, seq, dtype=torch.int64)]
    if uses_tt:
        args.append(torch.zeros(batch, seq, dtype=torch.int64))

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            out = self.inner(**dict(zip(names, inputs)))
            return out.last_hidden_state

    wrapped = Wrapper(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(wrapped, tuple(args), str(path), input_names=names,
                              output_names=["last_hidden_state"], opset_version=opset, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names}
                              | {"last_hidden_state": {0: "batch", 1: "sequence"}})
        elif exporter == "dynamo":
            b = torch.export.Dim("batch", min=1, max=1024)
            s = torch.export.Dim("sequence", min=1, max=model.config.max_position_embeddings - 4)
            prog = torch.onnx.export(wrapped, tuple(args), input_names=names,
                                     output_names=["last_hidden_state"], opset_version=opset, dynamo=True,
                                     dynamic_shapes=(tuple({0: b, 1: s} for _ in names),), verbose=False)
            prog.save(str(path), external_data=external_data)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    return path


def export_spec(spec: ExportSpec, path: Path) -> Path:
    model = build_model(tiny_config(spec.family, spec.attention))
    return export_encoder(model, path, spec.exporter, spec.opset, spec.token_type_ids)
