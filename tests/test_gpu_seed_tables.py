"""benchmarks/gpu_seed_tables.py in its CPU dry-run mode: tiny bert and GPT-2 with past, every engine timed,
parity against the export recorded (the CUDA run is the same code with the seed's grid)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_seed_tables.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_seed_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_times_every_engine_and_checks_parity(tmp_path):
    script = _script()
    assert script.main(["--dry-run", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tables.json").read_text())
    cells = {(r["model"], r["engine"], r["precision"], r["batch"], r["column"]) for r in data["rows"]}
    onnx_engines = [(script.EXPORT, "fp32"), (script.PEER, "fp32"), (script.PEER, "fp16"), (script.MLSTEP, "fp32"),
                    (script.MLSTEP, "fp16"), (script.UNFUSED, "fp32"), (script.UNFUSED, "fp16")]
    for model in ("bert", "gpt2"):
        for engine, precision in onnx_engines:
            for batch in script.DRY["batches"]:
                for column in script.DRY["columns"]:
                    assert (model, engine, precision, batch, column) in cells
    assert all(r["median_ms"] > 0 for r in data["rows"])
    assert {r["engine"] for r in data["rows"] if r["model"] == "bert"} >= {script.TORCH}
    parity = {(p["model"], p["engine"], p["precision"]): p for p in data["parity"]}
    for model in ("bert", "gpt2"):
        assert parity[(model, script.MLSTEP, "fp32")]["max_abs_diff"] < 1e-4
        assert parity[(model, script.MLSTEP, "fp16")]["finite"]
        assert parity[(model, script.MLSTEP, "fp16")]["max_abs_diff"] < 0.05
    text = (tmp_path / "tables.md").read_text()
    assert "s=8" in text and "past=8" in text and "max abs diff vs export" in text
