"""The corpus contract, shared by the Optimum fixtures and the random sweep.

A model from the corpus passes when mlstep (library API, default options):
- fuses it FULLY: one Attention or MultiHeadAttention per layer; no Softmax, Erf or Tanh left except the
  Tanh of a pooler / classification head (BERT, ALBERT, RoBERTa sequence classification); at least 2L-1
  SkipLayerNormalization; one EmbedLayerNormalization for encoders;
- keeps the function: the fp32 variant and the fp16 variant (built as the step builds it) match the
  original (run with every ONNX Runtime optimization off) within the step's own tolerances, on batch 3 with
  masks padded right and left, at a short and a long (>= 64) sequence, and for models with past at past > 0.

``violations`` and ``parity_failures`` return plain-language lines (empty = pass) so that a failing cell
says what is missing; ``refusals`` gives mlstep's own reasons for what it did not fuse.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from mlstep.optimizer import OptimizeOptions, OptimizeResult, optimize_file
from mlstep.validate import Case, check_parity, run_reference, synthesize_inputs

MS = "com.microsoft"
BATCH = 3
SHORT, LONG = 8, 72
# (past, new tokens) for models with past: a first step after one token, a mid-size past, and a long total.
PAST_STEPS = ((1, 1), (17, 8), (64, 8))

@dataclass(frozen=True)
class Expect:
    """What a fully fused model of this cell holds."""
    family: str             # bert | distilbert | roberta | albert | gpt2 | distilgpt2
    task: str               # feature-extraction | text-classification | fill-mask | text-generation[-with-past]
    layers: int
    vocab: int
    has_past: bool = False

    @property
    def encoder(self) -> bool:
        return self.family in ("bert", "distilbert", "roberta", "albert")

    @property
    def head_tanh(self) -> int:
        """Tanh nodes that are not a gelu: the pooler (BERT, ALBERT) or classifier dense (RoBERTa) of a
        sequence-classification head."""
        return int(self.task == "text-classification" and self.family in ("bert", "albert", "roberta"))


def optimize(path: Path) -> OptimizeResult:
    return optimize_file(path, OptimizeOptions(verbose=True))


def refusals(result: OptimizeResult) -> list[str]:
    """mlstep's reasons for what it did not fuse (coverage misses first, then the verbose log), deduplicated."""
    lines: list[str] = []
    for coverage in result.coverage.values():
        lines += [f"{coverage.kind}: {miss}" for miss in coverage.misses]
    for entry in result.log:
        lines += [f"{entry.name}: {reason}" for reason in entry.refused]
    return list(dict.fromkeys(lines))


def violations(model: ir.Model, expect: Expect) -> list[str]:
    """What keeps ``model`` from being fully fused (empty: fully fused)."""
    ops = Counter((node.domain or "", node.op_type) for node in model.graph)
    out = []
    attention = ops[(MS, "Attention")] + ops[(MS, "MultiHeadAttention")]
    if attention != expect.layers:
        out.append(f"attention fused {attention}/{expect.layers} layers")
    for op in ("Softmax", "Erf", "Gelu", "Attention"):      # ONNX's own Gelu / Attention (opset 20 / 23) too
        if ops[("", op)]:
            out.append(f"{ops[('', op)]} {op} left")
    if ops[("", "Tanh")] != expect.head_tanh:
        out.append(f"{ops[('', 'Tanh')]} Tanh left (expected {expect.head_tanh}: the head's)")
    skip = ops[(MS, "SkipLayerNormalization")]
    if skip < 2 * expect.layers - 1:
        out.append(f"SkipLayerNormalization {skip} < {2 * expect.layers - 1}")
    if expect.encoder and ops[(MS, "EmbedLayerNormalization")] != 1:
        out.append(f"EmbedLayerNormalization {ops[(MS, 'EmbedLayerNormalization')]}/1")
    return out


def short_steps(expect: Expect) -> tuple[tuple[int, int], ...]:
    """(past, sequence) pairs with a total under 64 tokens."""
    return PAST_STEPS[:2] if expect.has_past else ((0, SHORT),)


def long_steps(expect: Expect) -> tuple[tuple[int, int], ...]:
    """(past, sequence) pairs with a total of at least 64 tokens."""
    return PAST_STEPS[2:] if expect.has_past else ((0, LONG),)


def parity_cases(original: ir.Model, expect: Expect, steps: tuple[tuple[int, int], ...] | None = None
                 ) -> list[Case]:
    """Batch 3, unpadded, right- and left-padded, at each (past, sequence) of ``steps`` (default: the short and
    the long ones). Ids are kept inside the model's vocabulary."""
    cases = []
    for past, sequence in steps or short_steps(expect) + long_steps(expect):
        for case in synthesize_inputs(original, batch=BATCH, sequence=sequence, past_sequence=past):
            if "input_ids" in case.feeds:
                case.feeds["input_ids"] = case.feeds["input_ids"] % expect.vocab
            case.name = f"{case.name} past={past} seq={sequence}"
            cases.append(case)
    assert any(c.name.startswith("left-padded") for c in cases) and any(c.name.startswith("right") for c in cases)
    return cases


def build_variants(result: OptimizeResult, directory: Path) -> dict[str, Path]:
    """The fp32 and fp16 variants, saved as the step saves them."""
    try:
        from mlstep.variants import build_variants as build
    except ImportError:
        from mlstep.step import build_variants as build
    paths, _ = build(result.model, ("fp32", "fp16"), directory)
    return paths


def parity_failures(original: Path, variants: dict[str, Path], cases: list[Case]) -> list[str]:
    """One line per variant that misses the step's parity tolerance (empty: all pass)."""
    reference = run_reference(original, cases)
    out = []
    for precision, path in variants.items():
        result = check_parity(original, path, precision, cases, reference_outputs=reference)
        if not result.passed:
            out.append(f"{precision}: max |diff| {result.max_abs_diff:.3g} on {result.worst_output} "
                       f"({result.worst_case})")
    return out
