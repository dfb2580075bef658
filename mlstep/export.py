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


# --- GPT-2 (causal LM) --------------------------------------------------------------------------------

GPT2_TINY = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=128)


def tiny_gpt2_config(attention: str = "sdpa", **overrides):
    import transformers as tf

    cfg = tf.GPT2Config(**{**GPT2_TINY, **overrides})
    cfg._attn_implementation = attention
    return cfg


def build_gpt2(config, lm_head: bool = True, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cls = tf.GPT2LMHeadModel if lm_head else tf.GPT2Model
    model = cls(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    return model


def gpt2_io_names(n_layer: int, with_past: bool, lm_head: bool = True) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "position_ids", "attention_mask"]
    outputs = ["logits" if lm_head else "last_hidden_state"]
    if with_past:
        inputs += [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
        outputs += [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return inputs, outputs


class _GPT2Wrapper:
    """Flat tensors in and out: transformers 5 passes past state as a Cache object, ONNX wants tensors."""

    @staticmethod
    def make(model, with_past: bool):
        import torch
        from transformers import DynamicCache

        n_layer = model.config.n_layer
        lm_head = hasattr(model, "lm_head")

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, input_ids, position_ids, attention_mask, *past):
                cache = None
                if with_past:
                    cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(n_layer)],
                                         config=model.config)
                out = self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                 past_key_values=cache, use_cache=with_past)
                first = out.logits if lm_head else out.last_hidden_state
                if not with_past:
                    return first
                presents = []
                for layer in out.past_key_values.layers:
                    presents += [layer.keys, layer.values]
                return (first, *presents)

        return Wrapper().eval()


def export_gpt2(model, path: Path, exporter: str = "dynamo", opset: int = 18, with_past: bool = False,
                external_data: bool = False) -> Path:
    """Export GPT2Model / GPT2LMHeadModel. Inputs input_ids, position_ids, attention_mask (past + current)
    [, past_key_i, past_value_i]; outputs logits (or last_hidden_state) [, present_key_i, present_value_i];
    dynamic batch, sequence and past axes."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    lm_head = hasattr(model, "lm_head")
    names, outs = gpt2_io_names(cfg.n_layer, with_past, lm_head)
    batch, seq, past_len = 2, 3, 4 if with_past else 0
    head = cfg.n_embd // cfg.n_head
    args = [torch.randint(0, cfg.vocab_size, (batch, seq)),
            torch.arange(past_len, past_len + seq).repeat(batch, 1),
            torch.ones(batch, past_len + seq, dtype=torch.int64)]
    if with_past:
        args += [torch.randn(batch, cfg.n_head, past_len, head) for _ in range(2 * cfg.n_layer)]
    wrapped = _GPT2Wrapper.make(model, with_past)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "total_sequence"}}
            axes[outs[0]] = {0: "batch", 1: "sequence"}
            for n in names[3:]:
                axes[n] = {0: "batch", 2: "past_sequence"}
            for n in outs[1:]:
                axes[n] = {0: "batch", 2: "total_sequence"}
            torch.onnx.export(wrapped, tuple(args), str(path), input_names=names, output_names=outs,
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
        elif exporter == "dynamo":
            auto = torch.export.Dim.AUTO   # let torch.export relate mask length = past + sequence itself
            shapes = [{0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}]
            past_shapes = tuple({0: auto, 2: auto} for _ in range(2 * cfg.n_layer)) if with_past else ()
            prog = torch.onnx.export(wrapped, tuple(args), input_names=names, output_names=outs,
                                     opset_version=opset, dynamo=True,
                                     dynamic_shapes=(*shapes, past_shapes) if with_past else tuple(shapes),
                                     verbose=False)
            prog.save(str(path), external_data=external_data)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    return path
