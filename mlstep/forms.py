"""Form selection: which fused form of the model to hand over, decided by measurement on the target provider.

The fully fused graph is not always the fastest. On a 2-core CPU, ONNX Runtime's packed ``Attention`` kernel
loses to the plain MatMul/Softmax graph at short sequences and small batches, while the LayerNorm / Gelu
fusions cost nothing. So the step builds a few *forms* of the optimized model and keeps the fastest one that
passes parity, at the user's gated shapes, on the provider the variants are gated on:

=====================  ==================================================================================
form                   what it is
=====================  ==================================================================================
``fused``              every fusion (the optimizer's full result: packed Attention / MultiHeadAttention)
``attention-unfused``  attention left as the export wrote it; LayerNorm, SkipLayerNorm, Gelu, EmbedLayerNorm
                       fused (``OptimizeOptions.disabled_fusions`` + ``attention``)
``unfused``            no fusion at all: the export's graph after mlstep's clean-up passes only
=====================  ==================================================================================

A form that would be the same graph as one before it (attention already disabled, nothing fused at all) is
not built twice. Every candidate is parity-checked against the source exactly like a variant (the same cases,
``mlstep.validate.parity``); a candidate that fails parity is never chosen, however fast.

Measurement (:func:`measure`): one session per candidate, all created up front with the same providers, the
same ONNX Runtime session options as the latency gate (``ORT_ENABLE_ALL``: ONNX Runtime's own session-level
fusions run on every candidate and are part of what is measured; intra-op threads as the gate's, ORT's default
unless set), the same feeds (``mlstep.bench.gates.shaped_feeds``: batch x sequence, or one new token on a past
for decoders). Per shape the candidates are timed in interleaved rounds (candidate order rotated every round,
``iterations`` calls per round, calibrated to ~``target_round_ms``); a candidate's figure is the median of its
per-round means. Bounded: the rounds are fitted into ``budget_s`` (between ``min_rounds`` and ``max_rounds``).

Choice (:func:`choose`): the most fused form that passed parity is the reference; a less fused one replaces it
only when it is *confidently* faster: the per-round ratios of its time to the reference's (the rounds are
interleaved, so each round is a pair measured under the same machine load), pooled over the gated shapes, give a
geometric mean and a 95% interval (:func:`mlstep.gates.ratio_interval`, the latency gate's statistics), and the
interval's upper end must be below 1. Among such forms the lowest ratio wins. Within noise the more fused form
stays, so the choice does not flip between runs on a busy machine. No passing candidate: ``fused`` is kept and the
variants' parity gate fails as it would have.

The result (:class:`Selection`) goes into report.json under ``forms`` (:meth:`Selection.as_dict`) and into
the MLflow run as params/metrics (:func:`mlflow_fields`). The step then writes the chosen form as the fp32
variant (and converts it for fp16); the coverage gate still reads the fully fused form's coverage (it says what
the optimizer *can* fuse); a block the chosen form leaves unfused is named with the measurement that decided
it. The latency gate then compares the written variant with the untouched source, as always.

    candidates = build_candidates(fused_result.model, model_path, options, work_dir)
    selection = select(model_path, candidates, cases, shapes=[(2, 128)], providers=["CPUExecutionProvider"])
    selection.chosen, selection.as_dict()
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FUSED, ATTENTION_UNFUSED, UNFUSED = "fused", "attention-unfused", "unfused"
FORMS = (FUSED, ATTENTION_UNFUSED, UNFUSED)
AUTO = "auto"
DESCRIPTIONS = {
    FUSED: "every fusion (packed Attention / MultiHeadAttention, EmbedLayerNorm, SkipLayerNorm, Gelu)",
    ATTENTION_UNFUSED: "attention as exported; LayerNorm, SkipLayerNorm, Gelu, EmbedLayerNorm fused",
    UNFUSED: "no fusion: the export's graph after mlstep's clean-up passes",
}
ATTENTION_OPS = ("Attention", "MultiHeadAttention")
SESSION_LEVEL = "ORT_ENABLE_ALL"          # the latency gate's session level (mlstep.runtime.ENABLE_ALL)


@dataclass(frozen=True)
class Candidate:
    """One form, written as an ONNX file (``model`` kept for the variants stage; None when not needed)."""

    name: str
    path: Path
    fusions: Mapping[str, int]
    disabled_fusions: tuple[str, ...]
    model: Any = None


@dataclass(frozen=True)
class SelectSettings:
    shapes: tuple[tuple[int, int], ...] = ((2, 8),)   # gated (batch, sequence); decoders: (batch, past)
    threads: int = 0                  # intra-op threads: the latency gate's (0: ORT's default)
    warmup: int = 2                   # untimed calls per candidate and shape
    target_round_ms: float = 5.0      # calls per round calibrated to about this
    min_rounds: int = 5
    max_rounds: int = 15
    budget_s: float = 6.0             # measuring time per shape (all candidates), rounds fitted into it
    seed: int = 0


@dataclass(frozen=True)
class Timing:
    median_ms: float
    rounds: int
    iterations: int
    samples: tuple[float, ...] = ()        # per-round mean ms, in round order (paired across candidates)


@dataclass
class Selection:
    chosen: str
    reason: str
    measured: bool
    candidates: list[Candidate] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)        # name -> ParityResult (None: not checked)
    timings: dict[str, dict[str, Timing]] = field(default_factory=dict)   # name -> shape label -> Timing
    provider: str = ""
    threads: int = 0
    threads_setting: int = 0
    seconds: float = 0.0

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)

    def relative(self, name: str) -> float | None:
        """Geometric mean over shapes of this candidate's median / the fused form's (None: not measured)."""
        return _relative(self.timings, name)

    def as_dict(self) -> dict:
        shapes = sorted({s for t in self.timings.values() for s in t})
        return {
            "chosen": self.chosen, "reason": self.reason, "measured": self.measured,
            "provider": self.provider or None,
            "session": {"graph_optimization_level": SESSION_LEVEL, "intra_op_threads": self.threads or None,
                        "threads_setting": "ORT default" if not self.threads_setting else self.threads_setting},
            "shapes": shapes, "seconds": round(self.seconds, 3),
            "candidates": [{
                "name": c.name, "description": DESCRIPTIONS.get(c.name, c.name),
                "disabled_fusions": list(c.disabled_fusions), "fusions": dict(sorted(c.fusions.items())),
                "parity": _parity_dict(self.parity.get(c.name)),
                "median_ms": {s: round(t.median_ms, 4) for s, t in self.timings.get(c.name, {}).items()},
                "rounds": {s: t.rounds for s, t in self.timings.get(c.name, {}).items()},
                "iterations": {s: t.iterations for s, t in self.timings.get(c.name, {}).items()},
                "relative_to_fused": _round(self.relative(c.name)),
                "chosen": c.name == self.chosen,
            } for c in self.candidates],
        }


# ------------------------------------------------------------------------------------------- building

def plan(fused_ops: Mapping[str, int], disabled: frozenset[str]) -> list[tuple[str, frozenset[str]]]:
    """(form, disabled fusions) for each form worth building, given what the fused form contains."""
    from mlstep.optimizer.options import FUSIONS

    forms = [(FUSED, frozenset(disabled))]
    if "attention" not in disabled and any(fused_ops.get(op) for op in ATTENTION_OPS):
        forms.append((ATTENTION_UNFUSED, frozenset(disabled) | {"attention"}))
    if any(fused_ops.values()):
        forms.append((UNFUSED, frozenset(FUSIONS)))
    return forms


def build_candidates(fused_model, source_path: str | Path, options, directory: str | Path,
                     names: Sequence[str] | None = None) -> list[Candidate]:
    """Write each form of ``source_path`` as ``directory/<form>/model.onnx``.

    ``fused_model`` is the optimizer's full result (already computed by the step: not optimized again); the
    other forms are optimized afresh from the source with more fusions disabled. ``names`` limits the forms.
    """
    import dataclasses

    from mlstep.optimizer import io, optimize
    from mlstep.optimizer.passes import count_fused_ops

    source_path = Path(source_path)
    directory = Path(directory)
    fused_ops = dict(count_fused_ops(fused_model))
    out = []
    for name, disabled in plan(fused_ops, frozenset(options.disabled_fusions)):
        if names is not None and name not in names:
            continue
        if name == FUSED:
            model, fusions = fused_model, fused_ops
        else:
            opts = dataclasses.replace(options, disabled_fusions=disabled, verbose=False)
            result = optimize(io.load(source_path), opts, source_dir=source_path.parent)
            model, fusions = result.model, dict(result.fusions)
        path = io.save(model, directory / name / "model.onnx")
        out.append(Candidate(name, path, fusions, tuple(sorted(disabled)), model))
    return out


# ------------------------------------------------------------------------------------------- measuring

def shape_label(batch: int, sequence: int, past: bool = False) -> str:
    return f"{batch}x{'past' if past else ''}{sequence}"


def measure(candidates: Sequence[Candidate], shapes: Sequence[tuple[int, int]], providers: Sequence[str],
            settings: SelectSettings = SelectSettings(), feeds_model=None) -> tuple[dict, str, int]:
    """Interleaved timing of every candidate at every shape: (name -> shape label -> Timing, provider, threads).

    ``feeds_model`` (an onnx_ir model, default: the first candidate's) gives the signature the feeds are
    synthesized from (``mlstep.bench.gates.shaped_feeds``), so every candidate gets the same values.
    """
    from mlstep.bench.gates import has_past, shaped_feeds
    from mlstep.bench.latency import adapt_feeds, intra_op_threads, make_runner, open_session
    from mlstep.optimizer import io

    sessions = {c.name: open_session(c.path, providers, settings.threads) for c in candidates}
    provider = next(iter(sessions.values())).get_providers()[0] if sessions else ""
    signature = feeds_model if feeds_model is not None else io.load(candidates[0].path)
    past = has_past(signature)
    timings: dict[str, dict[str, Timing]] = {c.name: {} for c in candidates}
    for batch, sequence in shapes:
        feeds, _ = shaped_feeds(signature, batch, sequence, seed=settings.seed)
        runners = {name: make_runner(s, adapt_feeds(s, feeds)) for name, s in sessions.items()}
        label = shape_label(batch, sequence, past)
        call_ms = {}
        for name, run in runners.items():         # warm-up, and one call's cost to fit rounds in the budget
            for _ in range(settings.warmup):
                run()
            start = time.perf_counter()
            run()
            call_ms[name] = (time.perf_counter() - start) * 1e3
        slowest = max(call_ms.values())
        iterations = max(1, int(settings.target_round_ms / max(slowest, 1e-3)))
        round_ms = sum(call_ms.values()) * iterations
        rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.budget_s * 1e3 / max(round_ms, 1e-3))))
        samples: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                run = runners[name]
                start = time.perf_counter()
                for _ in range(iterations):
                    run()
                samples[name].append((time.perf_counter() - start) * 1e3 / iterations)
        for name, values in samples.items():
            timings[name][label] = Timing(statistics.median(values), rounds, iterations, tuple(values))
    return timings, provider, intra_op_threads(settings.threads)


# ------------------------------------------------------------------------------------------- choosing

def choose(names: Sequence[str], parity: Mapping[str, Any], timings: Mapping[str, Mapping[str, Timing]]
           ) -> tuple[str, str]:
    """(chosen form, why): the most fused form whose parity passed, unless a less fused passing form is
    confidently faster (:func:`ratio_to`: the upper end of its 95% interval below 1; the lowest ratio of those
    wins). ``parity[name]`` None means not checked: such a form can be chosen only when no form was checked
    (validation off)."""
    checked = any(parity.get(n) is not None for n in names)
    passing = [n for n in names if (parity.get(n) is not None and parity[n].passed) or (not checked and n in parity)]
    failing = [n for n in names if parity.get(n) is not None and not parity[n].passed]
    if not passing:
        return names[0], f"no form passed parity ({', '.join(failing)}): {names[0]} kept"
    measured = [n for n in passing if timings.get(n)]
    if not measured:
        return passing[0], f"not measured: {passing[0]} (the first form that passed parity)"
    reference = measured[0]
    estimates = {n: ratio_to(timings, n, reference) for n in measured[1:]}
    faster = [(est.ratio, names.index(n), n) for n, est in estimates.items() if est is not None and est.high < 1.0]
    best = min(faster)[2] if faster else reference
    figures = ", ".join(f"{n} {_figure(timings[n])}" for n in measured)
    shown = "; ".join(f"{n}/{reference} {est.ratio:.3f} [{est.low:.3f}, {est.high:.3f}]"
                      for n, est in estimates.items() if est is not None)
    why = (f"{best}: confidently faster than {reference}" if best != reference
           else f"{reference}: no less fused form is confidently faster") + f" ({figures}" + \
        (f"; time ratio, 95% interval: {shown})" if shown else ")")
    if failing:
        why += f"; failed parity, not eligible: {', '.join(failing)}"
    return best, why


def ratio_to(timings: Mapping[str, Mapping[str, Timing]], name: str, reference: str):
    """``name``'s time / ``reference``'s: geometric mean of the per-round ratios over every shape both were timed
    at, with its 95% interval (:class:`mlstep.gates.RatioEstimate`); forms timed without per-round samples count
    one pair per shape (their medians). None when they share no timed shape."""
    from mlstep.gates import ratio_interval

    mine, base = timings.get(name) or {}, timings.get(reference) or {}
    pairs = []
    for shape in mine:
        if shape not in base:
            continue
        a, b = mine[shape], base[shape]
        if a.samples and b.samples and len(a.samples) == len(b.samples):
            pairs += [([y], [x]) for x, y in zip(a.samples, b.samples)]
        else:
            pairs.append(([b.median_ms], [a.median_ms]))
    if not pairs:
        return None
    return ratio_interval([p[0] for p in pairs], [p[1] for p in pairs])


def select(source_path: str | Path, candidates: Sequence[Candidate], cases: Sequence, providers: Sequence[str],
           settings: SelectSettings = SelectSettings(), reference_outputs=None) -> Selection:
    """Parity of every candidate (``cases`` against the source; empty: not checked), interleaved timing at
    ``settings.shapes``, and the choice. ``reference_outputs``: the source's outputs on ``cases`` if known."""
    from mlstep.validate.parity import check_parity, run_reference

    start = time.perf_counter()
    names = [c.name for c in candidates]
    parity: dict[str, Any] = {}
    if cases:
        reference = reference_outputs if reference_outputs is not None else run_reference(source_path, cases, providers)
        for c in candidates:
            parity[c.name] = check_parity(source_path, c.path, "fp32", cases, providers=providers,
                                          reference_outputs=reference)
    else:
        parity = {c.name: None for c in candidates}
    eligible = [c for c in candidates if parity[c.name] is None or parity[c.name].passed]
    timings, provider, threads = ({}, "", 0)
    if len(candidates) > 1 and eligible:
        # a form that failed parity is not timed: it cannot be chosen, and timing it costs the user's budget
        from mlstep.optimizer import io

        timings, provider, threads = measure(eligible, settings.shapes, providers, settings,
                                             feeds_model=io.load(source_path))
    chosen, reason = choose(names, parity, timings)
    if len(candidates) == 1:
        chosen, reason = names[0], "only one form: nothing to choose between (no attention or nothing fused)"
    return Selection(chosen, reason, bool(timings), list(candidates), parity, timings, provider, threads,
                     settings.threads, time.perf_counter() - start)


def not_measured(candidates: Sequence[Candidate], reason: str, chosen: str = FUSED) -> Selection:
    """The selection when it is off (``--skip-benchmark``, ``--skip-validation``, a forced form)."""
    return Selection(chosen, reason, False, list(candidates), {c.name: None for c in candidates})


# ------------------------------------------------------------------------------------------- evidence

def mlflow_fields(forms: Mapping | None) -> tuple[dict[str, str], dict[str, float]]:
    """MLflow params / metrics from report.json's ``forms``: ``forms.chosen``, ``forms.candidates``,
    ``forms.session_level``, ``forms.intra_op_threads``; metrics ``forms.<form>.median_ms.<shape>`` and
    ``forms.<form>.relative_to_fused``."""
    if not forms:
        return {}, {}
    params = {"forms.chosen": str(forms["chosen"]),
              "forms.candidates": ",".join(c["name"] for c in forms["candidates"]),
              "forms.measured": str(forms["measured"]),
              "forms.session_level": forms["session"]["graph_optimization_level"],
              "forms.intra_op_threads": str(forms["session"]["intra_op_threads"]),
              "forms.provider": str(forms["provider"])}
    metrics = {}
    for c in forms["candidates"]:
        for shape, ms in c["median_ms"].items():
            metrics[f"forms.{c['name']}.median_ms.{shape}"] = float(ms)
        if c["relative_to_fused"] is not None:
            metrics[f"forms.{c['name']}.relative_to_fused"] = float(c["relative_to_fused"])
    return params, metrics


def _relative(timings: Mapping[str, Mapping[str, Timing]], name: str) -> float | None:
    mine, base = timings.get(name) or {}, timings.get(FUSED) or {}
    if not base:                                   # no fused timing: relative to the first measured form
        base = next((t for t in timings.values() if t), {})
    logs = [math.log(mine[s].median_ms / base[s].median_ms) for s in mine
            if s in base and mine[s].median_ms > 0 and base[s].median_ms > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _figure(timings: Mapping[str, Timing]) -> str:
    return "/".join(f"{t.median_ms:.3g} ms" for t in timings.values())


def _parity_dict(result) -> dict:
    if result is None:
        return {"passed": None, "max_abs_diff": None}
    diff = float(result.max_abs_diff)
    return {"passed": bool(result.passed), "max_abs_diff": diff if math.isfinite(diff) else None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
