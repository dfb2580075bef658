"""The gates: typed verdicts, decided before anything is rendered. Nothing else decides pass or fail.

Three gates, each a :class:`Verdict` (``state`` one of ``passed | failed | skipped | not_gated`` and a reason
in plain words):

- **parity** (per variant): the variant's outputs against the source's (``mlstep.validate.parity``);
  ``skipped`` with ``--skip-validation``.
- **coverage** (per run, the same for every variant): every transformer block the detector saw is fused.
  ``failed`` when a detected block stays unfused (``attention 0/2: layer 0: <reason>``), unless
  ``allow_partial`` (then ``passed``, the misses still in the reason); ``failed`` when nothing at all was
  detected (``nothing found to fuse``: a graph without transformer blocks is not an optimized model);
  ``not_gated`` when the optimizer reported no coverage.
- **latency** (per variant), noise-aware (:func:`decide_latency`): the source and the variant are timed in
  interleaved blocks (``mlstep.bench.gate_benchmarks``); per block the ratio of medians
  variant / source is one paired sample (a slow spell of the machine hits both); the gate works on the
  geometric mean of those ratios and its 95% confidence interval (Student t over blocks):

      limit = min(1 + max_slowdown, 1 / min_speedup)
      passed      when the interval's upper end <= limit
      failed      when the interval's lower end >  limit      (confidently slower than allowed)
      borderline  otherwise: re-measured (more blocks pooled) up to ``remeasure`` times; still
                  borderline at the end -> passed, "within noise of the limit" (the gate fails a variant
                  only when the measurements show it is slower than allowed)

  so a model that is clearly fine or clearly slow never flips, and one near the limit is measured more
  instead of deciding on one noisy median. fp16 on the CPU is ``not_gated`` unless asked (the GPU variant).

:class:`VariantVerdicts` bundles one variant's three verdicts; ``passed`` is true when none failed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mlstep.optimizer.coverage import BlockCoverage, nothing_detected

PASSED, FAILED, SKIPPED, NOT_GATED = "passed", "failed", "skipped", "not_gated"
STATES = (PASSED, FAILED, SKIPPED, NOT_GATED)
BORDERLINE = "borderline"            # a latency decision only: not a final state
NOTHING_TO_FUSE = "nothing found to fuse: the detector saw no transformer block in the source"

# Two-sided 95% Student t quantiles by degrees of freedom (1..30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


@dataclass(frozen=True)
class Verdict:
    gate: str                        # parity | latency | coverage
    state: str                       # one of STATES
    reason: str = ""                 # why (always set for failed / not_gated / skipped)

    def __post_init__(self):
        if self.state not in STATES:
            raise ValueError(f"unknown gate state {self.state!r}")

    @property
    def failed(self) -> bool:
        return self.state == FAILED


@dataclass(frozen=True)
class VariantVerdicts:
    parity: Verdict
    latency: Verdict
    coverage: Verdict

    @property
    def passed(self) -> bool:
        return not any(v.failed for v in (self.parity, self.latency, self.coverage))

    def failures(self, variant: str) -> list[str]:
        """``fp16 parity (max |diff| 3.1e-02 on 'logits')`` for each failed gate."""
        return [f"{variant} {v.gate} ({v.reason})" for v in (self.coverage, self.parity, self.latency) if v.failed]


def failures(verdicts: Mapping[str, VariantVerdicts]) -> list[str]:
    """One phrase per failed gate of every variant; the coverage gate (the same for all) named once."""
    out: list[str] = []
    coverage = next((v.coverage for v in verdicts.values() if v.coverage.failed), None)
    if coverage is not None:
        out.append(f"coverage ({coverage.reason})")
    for name, v in verdicts.items():
        out += [f"{name} {g.gate} ({g.reason})" for g in (v.parity, v.latency) if g.failed]
    return out


# ------------------------------------------------------------------------------------------- parity

def parity_verdict(result) -> Verdict:
    """From a ``ParityResult`` (None: validation skipped)."""
    if result is None:
        return Verdict("parity", SKIPPED, "--skip-validation")
    diff = result.max_abs_diff
    text = "nan" if diff is None or not math.isfinite(diff) else f"{diff:.2e}"
    where = f"max |diff| {text} on {result.worst_output!r}" + (f" in {result.worst_case}" if result.worst_case else "")
    return Verdict("parity", PASSED if result.passed else FAILED, where)


# ----------------------------------------------------------------------------------------- coverage

def coverage_verdict(coverage: Mapping[str, BlockCoverage] | None, allow_partial: bool = False) -> Verdict:
    if not coverage:
        return Verdict("coverage", NOT_GATED, "the optimizer reported no block coverage")
    if nothing_detected(dict(coverage)):
        return Verdict("coverage", FAILED, NOTHING_TO_FUSE)
    missed = [c for c in coverage.values() if not c.complete]
    if not missed:
        return Verdict("coverage", PASSED, ", ".join(f"{c.kind} {c.fused}/{c.detected}"
                                                     for c in coverage.values() if c.detected))
    text = "; ".join(c.line() for c in missed)
    if allow_partial:
        return Verdict("coverage", PASSED, f"{text} (allowed by --allow-partial-fusion)")
    return Verdict("coverage", FAILED, f"{text} (--allow-partial-fusion to accept)")


def unfused_warnings(coverage: Mapping[str, BlockCoverage] | None) -> list[str]:
    """One line per detected block kind that stayed (partly) unfused, every miss named."""
    out = []
    for c in (coverage or {}).values():
        if not c.complete:
            misses = "; ".join(c.misses) if c.misses else "no reason given"
            out.append(f"{c.kind} {c.fused}/{c.detected} fused: {misses}")
    return out


# ------------------------------------------------------------------------------------------ latency

@dataclass(frozen=True)
class RatioEstimate:
    """Variant / source latency: geometric mean of the per-block ratios of medians, 95% interval."""

    ratio: float
    low: float
    high: float
    blocks: int

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio if self.ratio > 0 else 0.0


@dataclass(frozen=True)
class LatencyDecision:
    state: str                       # passed | failed | borderline
    estimate: RatioEstimate | None
    limit: float
    reason: str


def ratio_interval(baseline_blocks: Sequence[Sequence[float]], variant_blocks: Sequence[Sequence[float]]
                   ) -> RatioEstimate | None:
    """Paired per-block ratios -> geometric mean and 95% t interval; None without a valid pair."""
    logs = []
    for base, var in zip(baseline_blocks, variant_blocks):
        b, v = _median(base), _median(var)
        if b > 0 and v > 0 and math.isfinite(b) and math.isfinite(v):
            logs.append(math.log(v / b))
    if not logs:
        return None
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return RatioEstimate(math.exp(mean), math.exp(mean), math.exp(mean), n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    return RatioEstimate(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n)


def latency_limit(max_slowdown: float = 0.05, min_speedup: float | None = None) -> float:
    limit = 1.0 + max_slowdown
    if min_speedup:
        limit = min(limit, 1.0 / min_speedup)
    return limit


def decide_latency(baseline_blocks: Sequence[Sequence[float]], variant_blocks: Sequence[Sequence[float]],
                   max_slowdown: float = 0.05, min_speedup: float | None = None,
                   final: bool = True) -> LatencyDecision:
    """The latency rule on recorded per-block samples (milliseconds); see the module docstring.

    ``final=False`` may answer ``borderline`` (measure more); ``final=True`` never does.
    """
    limit = latency_limit(max_slowdown, min_speedup)
    est = ratio_interval(baseline_blocks, variant_blocks)
    if est is None:
        return LatencyDecision(FAILED, None, limit, "no valid timing")
    shown = (f"speedup {est.speedup:.2f}x, ratio {est.ratio:.3f} [{est.low:.3f}, {est.high:.3f}] over "
             f"{est.blocks} blocks vs limit {limit:.3f}")
    if est.high <= limit:
        return LatencyDecision(PASSED, est, limit, shown)
    if est.low > limit:
        need = (f"max slowdown {max_slowdown:g}" if limit == 1.0 + max_slowdown
                else f"min speedup {min_speedup:g}x")
        return LatencyDecision(FAILED, est, limit, f"{shown} ({need})")
    if not final:
        return LatencyDecision(BORDERLINE, est, limit, shown)
    return LatencyDecision(PASSED, est, limit, f"{shown}: within noise of the limit after re-measuring")


def latency_verdict(gate) -> Verdict:
    """From a ``mlstep.bench.gates.VariantGate`` (None: benchmark skipped)."""
    if gate is None:
        return Verdict("latency", SKIPPED, "--skip-benchmark")
    if not gate.gated:
        return Verdict("latency", NOT_GATED, gate.reason)
    return Verdict("latency", PASSED if gate.passed else FAILED, gate.reason)


def decide(parity_result, latency_gate, coverage: Verdict) -> VariantVerdicts:
    """One variant's verdicts from its facts (the coverage verdict is the run's)."""
    return VariantVerdicts(parity_verdict(parity_result), latency_verdict(latency_gate), coverage)


def _median(values: Sequence[float]) -> float:
    data = sorted(float(x) for x in values)
    if not data:
        return math.nan
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2
