"""Seeded random transformer configs for the corpus sweep, and their real exports (torch 2.13 + transformers 5).

``draw(seed)`` gives one ``SweepConfig``: family (bert, distilbert, roberta, albert, gpt2), exporter and opset
(TorchScript 14..17, dynamo 18, 20 or 23), attention (sdpa, eager), 1-4 layers, 1-16 heads (non powers of two
included) with head sizes 8-64 (hidden capped at 384 to keep exports small), a vocabulary of 40-1000 rows,
with or without token types (BERT, ALBERT, RoBERTa) and a task head: sequence classification, masked LM or
the base model for encoders; causal LM (with or without past) or the base model for GPT-2. ``cfg.id`` spells
every draw, so a failing test id is a reproducible config (``draw(seed)`` gives it back).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("bert", "distilbert", "roberta", "albert", "gpt2")
MAX_HIDDEN = 384
MAX_POSITIONS = 128
DYNAMO_OPSETS = (18, 20, 23)   # 18: decomposed sdpa and gelu; 20: ONNX's Gelu op; 23: its Attention op too


@dataclass(frozen=True)
class SweepConfig:
    seed: int
    family: str
    exporter: str           # torchscript | dynamo
    opset: int
    attention: str          # sdpa | eager
    layers: int
    heads: int
    head_size: int
    vocab: int
    token_types: bool
    task: str               # base | sequence-classification | masked-lm | causal-lm
    with_past: bool = False

    @property
    def hidden(self) -> int:
        return self.heads * self.head_size

    @property
    def id(self) -> str:
        exporter = f"ts{self.opset}" if self.exporter == "torchscript" else f"dynamo{self.opset}"
        return (f"s{self.seed}-{self.family}-{exporter}-{self.attention}-L{self.layers}-H{self.heads}x"
                f"{self.head_size}-v{self.vocab}-{'tt' if self.token_types else 'nott'}-{self.task}"
                + ("-past" if self.with_past else ""))

    @property
    def contract_task(self) -> str:
        """The task name the corpus contract knows (Optimum's spelling)."""
        return {"base": "feature-extraction", "sequence-classification": "text-classification",
                "masked-lm": "fill-mask"}.get(self.task, "text-generation")


def draw(seed: int, family: str | None = None) -> SweepConfig:
    rng = random.Random(seed)
    family = family or rng.choice(FAMILIES)
    exporter = rng.choice(("torchscript", "dynamo"))
    # dynamo's opset from a second stream, so that every other field of a draw stays what it was when dynamo was 18
    opset = rng.randint(14, 17) if exporter == "torchscript" else random.Random(f"opset{seed}").choice(DYNAMO_OPSETS)
    heads = rng.randint(1, 16)
    head_size = rng.randint(8, min(64, MAX_HIDDEN // heads))
    if family == "gpt2":
        task = rng.choice(("causal-lm", "causal-lm", "base"))
        with_past = task == "causal-lm" and rng.random() < 0.5
        token_types = False
    else:
        task = rng.choice(("base", "sequence-classification", "masked-lm"))
        with_past = False
        token_types = family != "distilbert" and rng.random() < 0.5
    return SweepConfig(seed, family, exporter, opset, rng.choice(("sdpa", "eager")), rng.randint(1, 4), heads,
                       head_size, rng.randint(40, 1000), token_types, task, with_past)


def config_of(cfg: SweepConfig):
    """The transformers config of ``cfg`` (also written beside sweep exports for Optimum's ORTOptimizer)."""
    import transformers as tf

    intermediate = 2 * cfg.hidden + 8
    if cfg.family == "bert":
        config = tf.BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                               num_attention_heads=cfg.heads, intermediate_size=intermediate,
                               max_position_embeddings=MAX_POSITIONS)
    elif cfg.family == "roberta":
        config = tf.RobertaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                                  num_attention_heads=cfg.heads, intermediate_size=intermediate,
                                  max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1)
    elif cfg.family == "albert":
        config = tf.AlbertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                                 num_attention_heads=cfg.heads, intermediate_size=intermediate,
                                 embedding_size=max(8, cfg.hidden // 2), max_position_embeddings=MAX_POSITIONS)
    elif cfg.family == "distilbert":
        config = tf.DistilBertConfig(vocab_size=cfg.vocab, dim=cfg.hidden, n_layers=cfg.layers, n_heads=cfg.heads,
                                     hidden_dim=intermediate, max_position_embeddings=MAX_POSITIONS)
    elif cfg.family == "gpt2":
        config = tf.GPT2Config(vocab_size=cfg.vocab, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
                               n_positions=MAX_POSITIONS, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(cfg.family)
    if cfg.task == "sequence-classification":
        config.num_labels = 3
    config._attn_implementation = cfg.attention
    return config


def build(cfg: SweepConfig):
    """The seeded random-weight model with every parameter perturbed (no zero bias, no unit scale)."""
    import torch
    import transformers as tf

    auto = {"base": tf.AutoModel, "sequence-classification": tf.AutoModelForSequenceClassification,
            "masked-lm": tf.AutoModelForMaskedLM, "causal-lm": tf.AutoModelForCausalLM}[cfg.task]
    torch.manual_seed(cfg.seed)
    model = auto.from_config(config_of(cfg), attn_implementation=cfg.attention)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def export(cfg: SweepConfig, path: Path) -> Path:
    """Export ``cfg`` with torch.onnx (TorchScript or dynamo) to ``path``, weights inline."""
    import onnx_ir as ir

    from mlstep.export import export_gpt2

    model = build(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.family == "gpt2":
        export_gpt2(model, path, cfg.exporter, cfg.opset, with_past=cfg.with_past)
    else:
        _export_encoder(model, path, cfg)
    if cfg.exporter == "dynamo":   # dynamo wrote its weights beside the model: inline them
        onnx_model = ir.external_data.load_to_model(ir.load(path))
        ir.save(onnx_model, path)
    return path


def _export_encoder(model, path: Path, cfg: SweepConfig) -> None:
    """Inputs input_ids, attention_mask[, token_type_ids]; output ``logits`` for a head, else
    ``last_hidden_state``; dynamic batch and sequence."""
    import torch

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if cfg.token_types else [])
    output = "last_hidden_state" if cfg.task == "base" else "logits"
    batch, seq = 2, 8
    args = (torch.randint(3, cfg.vocab, (batch, seq)), torch.ones(batch, seq, dtype=torch.int64)) + \
        ((torch.zeros(batch, seq, dtype=torch.int64),) if cfg.token_types else ())

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return getattr(self.inner(**dict(zip(names, inputs))), output)

    wrapped = Wrapper(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if cfg.exporter == "torchscript":
            torch.onnx.export(wrapped, args, str(path), input_names=names, output_names=[output],
                              opset_version=cfg.opset, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names + [output]})
        else:
            b = torch.export.Dim("batch", min=1, max=1024)
            s = torch.export.Dim("sequence", min=1, max=MAX_POSITIONS - 4)
            program = torch.onnx.export(wrapped, args, input_names=names, output_names=[output],
                                        opset_version=cfg.opset, dynamo=True,
                                        dynamic_shapes=(tuple({0: b, 1: s} for _ in names),), verbose=False)
            program.save(str(path))
