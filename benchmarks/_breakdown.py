"""Per-step time and RSS of mlstep's optimizer pipeline on one model (run as a fresh child).

    .venv/bin/python benchmarks/_breakdown.py MODEL.onnx OUT.onnx [--cprofile N]

Mirrors mlstep.optimizer.pipeline.optimize step by step (load, prepare, detect, each fusion, cleanup,
save). Before each step the kernel's peak-RSS counter is reset (/proc/self/clear_refs "5") so the "peak"
column is that step's own high-water mark.
"""
from __future__ import annotations

import cProfile
import io as _io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    model_path, out_path = sys.argv[1], sys.argv[2]
    top = int(sys.argv[sys.argv.index("--cprofile") + 1]) if "--cprofile" in sys.argv else 0
    from mlstep.optimizer import io
    from mlstep.optimizer.detect import detect
    from mlstep.optimizer.fusions import FUSION_ORDER
    from mlstep.optimizer.fusions._base import FusionContext, run_fusion
    from mlstep.optimizer.options import OptimizeOptions
    from mlstep.optimizer.passes import prepare
    from mlstep.optimizer.pipeline import _cleanup

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    profiler = cProfile.Profile() if top else None
    state: dict = {}

    def step(name, fn):
        resettable = _reset_peak()
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        value = fn()
        if profiler:
            profiler.disable()
        dt = time.perf_counter() - t
        rows.append((name, dt, _status("VmRSS"), _status("VmHWM") if resettable else float("nan")))
        return value

    options = OptimizeOptions()
    rows.append(("(imports)", 0.0, _status("VmRSS"), _status("VmHWM")))
    model = step("load", lambda: io.load(model_path))
    step("prepare", lambda: prepare(model))
    detected = step("detect", lambda: detect(model, options))
    ctx = FusionContext(detected.model_type, detected.num_heads, detected.hidden_size, False)
    for fusion in FUSION_ORDER:
        log = step(f"fusion:{fusion.name}", lambda f=fusion: run_fusion(f, model, ctx, explain=False))
        state[fusion.name] = log.fused
    step("cleanup", lambda: _cleanup(model))
    if "--save-external" in sys.argv:  # every weight into <name>.data, whatever io.save's threshold says
        import onnx_ir as ir

        step("save (all external)", lambda: ir.save(model, out_path, external_data=Path(out_path).name + ".data"))
    else:
        step("save", lambda: io.save(model, out_path))

    print(f"{'step':28s} {'seconds':>8s} {'RSS after MiB':>14s} {'step peak MiB':>14s}")
    for name, dt, rss, hwm in rows:
        extra = f"  fused {state[name[7:]]}" if name.startswith("fusion:") else ""
        print(f"{name:28s} {dt:8.2f} {rss:14.0f} {hwm:14.0f}{extra}")
    print(f"{'total':28s} {sum(r[1] for r in rows):8.2f}")
    if profiler:
        s = _io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(top)
        print(s.getvalue())


if __name__ == "__main__":
    main()
