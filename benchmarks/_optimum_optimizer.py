"""Run Hugging Face Optimum's ORTOptimizer (O2 or O3) on one model: a peer for ``fusion_matrix.py --corpus``.

Runs with the Optimum fixture environment's python (tests/corpus/optimum/requirements.txt), never the
project's: ``fusion_matrix.py`` calls it in a subprocess and checks the result in the project's environment.

    <optimum venv>/bin/python benchmarks/_optimum_optimizer.py LEVELS MODEL OUT_DIR \
        (--fixture FAMILY TASK | --config CONFIG_JSON)          # LEVELS: e.g. O2,O3

ORTOptimizer reads a folder holding ``model.onnx`` and the transformers ``config.json``: the config comes from
the fixture script's own ``config_for`` (Optimum fixtures) or from a JSON file (sweep rows). The optimized model
for each level is written to OUT_DIR/<level>.onnx; the last stdout line maps each level to its path or to
``{"error": "..."}``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "corpus" / "optimum"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("levels", help="comma-separated: O1, O2, O3, O4")
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("--fixture", nargs=2, metavar=("FAMILY", "TASK"))
    ap.add_argument("--config")
    args = ap.parse_args()
    made: dict = {}
    with tempfile.TemporaryDirectory(prefix="ortoptimizer-") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        shutil.copyfile(args.model, folder / "model.onnx")
        for level in args.levels.split(","):
            try:
                from optimum.onnxruntime import ORTOptimizer
                from optimum.onnxruntime.configuration import AutoOptimizationConfig

                if not (folder / "config.json").exists():
                    if args.fixture:
                        sys.path.insert(0, str(FIXTURES))
                        import make_fixtures

                        family, task = args.fixture
                        make_fixtures.config_for(make_fixtures.ARCHS[family], task).save_pretrained(folder)
                    else:
                        shutil.copyfile(args.config, folder / "config.json")
                optimizer = ORTOptimizer.from_pretrained(folder)
                optimizer.optimize(save_dir=Path(tmp) / level,
                                   optimization_config=getattr(AutoOptimizationConfig, level)())
                out = Path(args.out_dir) / f"{level}.onnx"
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(tmp) / level / "model_optimized.onnx", out)
                made[level] = str(out)
            except Exception as err:  # a peer's failure is a table cell
                made[level] = {"error": " ".join(f"{type(err).__name__}: {err}".split())[:300]}
    print(json.dumps(made))
    return 0

if __name__ == "__main__":
    sys.exit(main())
