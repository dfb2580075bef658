"""Coverage: the transformer blocks the detector saw, per kind, and which of them a fusion took.

This is the contract between the optimizer (which fills it) and the step (whose coverage gate, warning and
report read it). A block kind is one of ``KINDS``; a miss names the block and says why it stayed unfused,
in plain words (``"layer 0: the attention scale is not a constant"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("attention", "embedding", "layer_norm", "skip_layer_norm", "gelu")


@dataclass(frozen=True)
class BlockCoverage:
    kind: str                           # one of KINDS
    detected: int                       # blocks of this kind the detector saw in the source
    fused: int                          # of those, how many a fusion took
    misses: tuple[str, ...] = field(default=())   # one line per unfused block: "<where>: <reason>"

    @property
    def complete(self) -> bool:
        return self.fused >= self.detected

    def line(self) -> str:
        """``attention 2/3: layer 1: <reason>`` (the first miss; the rest are in ``misses``)."""
        head = f"{self.kind} {self.fused}/{self.detected}"
        return head if self.complete or not self.misses else f"{head}: {self.misses[0]}"


def nothing_detected(coverage: dict[str, BlockCoverage]) -> bool:
    """True when the detector saw no transformer block at all (nothing to optimize)."""
    return not any(c.detected for c in coverage.values())


def incomplete(coverage: dict[str, BlockCoverage]) -> list[BlockCoverage]:
    return [c for c in coverage.values() if not c.complete]
