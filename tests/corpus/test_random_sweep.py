"""A seeded random sweep of transformer configs (corpus_sweep.draw), exported at test time by torch 2.13 (TorchScript and
dynamo) from transformers 5: every draw fully fused with fp32 and fp16 parity (see corpus_contract).

Test ids spell the whole config (``s7-roberta-ts17-sdpa-L2-H2x12-v78-tt-masked-lm``: seed, family, exporter and
opset, attention, layers, heads x head size, vocabulary, token types, task head[, past]); ``corpus_sweep.draw(7)``
rebuilds it. Always on: ALWAYS_SEEDS (five draws that between them cover BERT, RoBERTa, ALBERT and GPT-2 with
past, TorchScript and dynamo, eager and sdpa, fused and known gaps). Slow: SLOW_SEEDS.

Draws the engine does not fully fuse yet are listed in KNOWN_GAPS with mlstep's own refusal (strict xfail).
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir
import pytest
from corpus_contract import (Expect, build_variants, optimize, parity_cases, parity_failures, refusals,
                             violations)
from corpus_sweep import SweepConfig, draw, export

ALWAYS_SEEDS = (2, 6, 7, 9, 23)
# The slow slice: draws 0..15 (MLSTEP_SWEEP_DRAWS=N widens it to 0..N-1; 24 draws took 17 min on 2 busy cores).
SLOW_SEEDS = tuple(s for s in range(int(os.environ.get("MLSTEP_SWEEP_DRAWS", "16"))) if s not in ALWAYS_SEEDS)

# config id -> the reason mlstep gives for not fusing it fully (on the engine of this branch).
KNOWN_GAPS: dict[str, str] = {}


def params(seeds, slow: bool) -> list:
    out = []
    for seed in seeds:
        cfg = draw(seed)
        marks = [pytest.mark.slow] if slow else []
        if cfg.id in KNOWN_GAPS:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[cfg.id]))
        out.append(pytest.param(cfg, id=cfg.id, marks=marks))
    return out


def expect(cfg: SweepConfig) -> Expect:
    return Expect(cfg.family, cfg.contract_task, cfg.layers, cfg.vocab, cfg.with_past)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep")


def check(cfg: SweepConfig, directory: Path) -> None:
    source = export(cfg, directory / cfg.id / "model.onnx")
    result = optimize(source)
    missing = violations(result.model, expect(cfg))
    assert not missing, f"{cfg.id}: {'; '.join(missing)}; mlstep says: {' | '.join(refusals(result)[:4])}"
    variants = build_variants(result, directory / cfg.id / "variants")
    failures = parity_failures(source, variants, parity_cases(ir.load(source), expect(cfg)))
    assert not failures, f"{cfg.id}: {'; '.join(failures)}"


def test_draws_are_reproducible_and_span_the_space():
    draws = [draw(s) for s in ALWAYS_SEEDS + SLOW_SEEDS]
    assert [d.id for d in draws] == [draw(s).id for s in ALWAYS_SEEDS + SLOW_SEEDS]
    assert {d.family for d in draws} == {"bert", "distilbert", "roberta", "albert", "gpt2"}
    assert {d.exporter for d in draws} == {"torchscript", "dynamo"}
    assert {d.opset for d in draws if d.exporter == "dynamo"} == {18, 20, 23}
    assert {d.task for d in draws} == {"base", "sequence-classification", "masked-lm", "causal-lm"}
    assert any(d.heads & (d.heads - 1) for d in draws) and any(d.with_past for d in draws)
    assert {d.token_types for d in draws} == {True, False}
    assert all(8 <= d.head_size <= 64 and 1 <= d.heads <= 16 and 1 <= d.layers <= 4 for d in draws)


@pytest.mark.parametrize("cfg", params(ALWAYS_SEEDS, slow=False))
def test_sweep_fully_fused_with_parity(cfg, sweep_dir):
    check(cfg, sweep_dir)


@pytest.mark.parametrize("cfg", params(SLOW_SEEDS, slow=True))
def test_sweep_slow_fully_fused_with_parity(cfg, sweep_dir):
    check(cfg, sweep_dir)
