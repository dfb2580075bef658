"""Latency measurement (and, in later issues, the pytest-benchmark gates, seed-style tables and plots)."""
from mlstep.bench.latency import LatencyStats, measure

__all__ = ["LatencyStats", "measure"]
