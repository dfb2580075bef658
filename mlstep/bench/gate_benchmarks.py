"""The latency gates as a pytest-benchmark module (shipped in the package; run by :func:`mlstep.bench.gates.run_gates`).

Not collected by an ordinary ``pytest`` run (the name does not start with ``test_``, and without a config
every case skips). It reads its config from the JSON file named by ``MLSTEP_GATE_CONFIG``::

    {"models": [{"name": "baseline", "path": "src.onnx"}, {"name": "fp32", "path": "fp32/model.onnx"}, ...],
     "feeds": "feeds.npz", "providers": ["CPUExecutionProvider"], "threads": 0,
     "warmup": 5, "repeat": 30, "blocks": 5, "iterations": 0, "target_round_ms": 5.0}

How it measures (chosen to be stable on a small, shared, noisy CPU):

- one session per model, all created up front in this process with the same providers, threads and feeds;
- ``iterations`` calls per round (0: calibrated once on the baseline so that a round lasts about
  ``target_round_ms``; the same count for every model), so a round's time is an average over several calls;
- ``repeat`` timed rounds per model, split into ``blocks`` that are interleaved: block 0 runs baseline,
  fp32, fp16; block 1 runs fp32, fp16, baseline; ... (rotated), so a slow spell of the machine (another
  process, frequency scaling) falls on every model instead of on one;
- ``warmup`` untimed rounds per model before any timing (interleaved too) and one more at the start of
  every block (caches refilled after the previous model ran); the garbage collector is off while timing
  (``--benchmark-disable-gc``).

Each (block, model) is one pytest-benchmark case (``test_latency[fp32-block2]``) in group ``mlstep-gates``;
``extra_info`` carries the model name, its path, the block, the provider that actually ran, whether IO
binding was used and the intra-op threads. The gate (``mlstep.bench.gates``) pools the rounds of all blocks
of a model from the JSON (``--benchmark-json``, which always includes the per-round data).

Standalone (to reproduce a CI figure)::

    MLSTEP_GATE_CONFIG=config.json pytest -p no:cacheprovider mlstep/bench/gate_benchmarks.py \\
        --benchmark-json out.json --benchmark-disable-gc
"""
from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import pytest

CONFIG_ENV = "MLSTEP_GATE_CONFIG"
GROUP = "mlstep-gates"
MAX_ITERATIONS = 10_000


def _config() -> dict | None:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _cases(config: dict) -> list[tuple[int, str]]:
    """(block, model) in run order: block-major, the model order rotated by one each block."""
    names = [m["name"] for m in config["models"]]
    order = []
    for block in range(config["blocks"]):
        shift = block % len(names)
        order += [(block, name) for name in names[shift:] + names[:shift]]
    return order


def pytest_generate_tests(metafunc):
    if "gate_case" not in metafunc.fixturenames:
        return
    config = _config()
    if config is None:
        metafunc.parametrize("gate_case", [pytest.param(None, marks=pytest.mark.skip(
            reason=f"{CONFIG_ENV} is not set (run through mlstep.bench.gates.run_gates)"))])
        return
    cases = _cases(config)
    metafunc.parametrize("gate_case", cases, ids=[f"{name}-block{block}" for block, name in cases])


@pytest.fixture(scope="module")
def gate_models():
    """Every model's session and runner, warmed up, plus the iterations per round."""
    from mlstep.bench.latency import adapt_feeds, intra_op_threads, make_runner, open_session, uses_io_binding

    config = _config()
    with np.load(config["feeds"]) as stored:
        feeds = {name: stored[name] for name in stored.files}
    models = {}
    for model in config["models"]:
        session = open_session(model["path"], config["providers"], config["threads"])
        models[model["name"]] = {
            "run": make_runner(session, adapt_feeds(session, feeds)),
            "info": {"model": model["name"], "path": model["path"], "provider": session.get_providers()[0],
                     "io_binding": uses_io_binding(session), "threads": intra_op_threads(config["threads"])},
        }
    first = models[config["models"][0]["name"]]["run"]
    iterations = int(config.get("iterations") or 0)
    if iterations < 1:                       # calibrate on the baseline: a round lasts ~target_round_ms
        first()
        probe = []
        for _ in range(5):
            start = time.perf_counter()
            first()
            probe.append(time.perf_counter() - start)
        per_call_ms = max(statistics.median(probe) * 1e3, 1e-6)
        iterations = int(min(MAX_ITERATIONS, max(1, round(config.get("target_round_ms", 5.0) / per_call_ms))))
    for _ in range(config["warmup"]):        # warm up interleaved, like the timing
        for entry in models.values():
            for _ in range(iterations):
                entry["run"]()
    return {"models": models, "iterations": iterations,
            "rounds": -(-config["repeat"] // config["blocks"])}


def test_latency(benchmark, gate_case, gate_models):
    block, name = gate_case
    entry = gate_models["models"][name]
    benchmark.group = GROUP
    benchmark.extra_info.update(entry["info"], block=block, iterations=gate_models["iterations"])
    benchmark.pedantic(entry["run"], rounds=gate_models["rounds"], iterations=gate_models["iterations"],
                       warmup_rounds=1)
