"""BERT from a config -> ONNX -> MLflow (registered, alias ``candidate``) -> ``mlstep optimize`` -> ``mlstep
promote`` the fp32 variant to ``champion``.

    python examples/bert_register_optimize_promote.py                    # tiny BERT, temporary MLflow store
    python examples/bert_register_optimize_promote.py --tracking-uri http://127.0.0.1:5000 --keep
    python examples/bert_register_optimize_promote.py --skip-benchmark   # parity gate only (fast, CPU)

The MLflow store is ``--tracking-uri`` when given, else an embedded one (a sqlite file + artifact folder) in
the work folder. The optimize and promote steps run the ``mlstep`` command exactly as a CI job does; the
store reaches it through ``MLFLOW_TRACKING_URI``. Offline: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def mlstep_command() -> list[str]:
    script = Path(sys.executable).parent / "mlstep"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlstep.cli.main"]


def mlstep(*args: str, env: dict, cwd: Path) -> int:
    print("$ mlstep " + " ".join(args), flush=True)
    return subprocess.call(mlstep_command() + list(args), env=env, cwd=cwd)


def export_bert(path: Path, tiny: bool) -> Path:
    from transformers import BertConfig

    from mlstep.export import build_model, export_encoder, tiny_config

    config = tiny_config("bert") if tiny else BertConfig()
    config._attn_implementation = "sdpa"
    return export_encoder(build_model(config), path, exporter="dynamo", opset=18)


def register_source(onnx_path: Path, name: str, alias: str, tracking_uri: str, artifacts: Path) -> str:
    """Log the exported model in an MLflow run, register it as a new version of ``name``, point ``alias`` at it."""
    import mlflow
    import mlflow.onnx
    import onnx

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    experiment = "bert-export"
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=artifacts.as_uri() if artifacts else None)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="export bert"):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", registered_model_name=name)
    version = info.registered_model_version
    client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}/{version}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the work folder)")
    parser.add_argument("--name", default="bert-tiny", help="registered model name")
    parser.add_argument("--bert-base", action="store_true", help="BertConfig() instead of a tiny config")
    parser.add_argument("--workdir", type=Path, help="work folder (default: temporary, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--skip-benchmark", action="store_true", help="no latency gate (parity only)")
    parser.add_argument("--max-slowdown", default="0.5",
                        help="latency gate for optimize (tiny models on a CPU are noisy; default 0.5)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mlstep-example-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    embedded = not args.tracking_uri
    tracking_uri = args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        onnx_path = export_bert(workdir / "bert.onnx", tiny=not args.bert_base)
        print(f"exported {onnx_path}", flush=True)
        source = register_source(onnx_path, args.name, "candidate", tracking_uri,
                                 workdir / "mlruns" if embedded else None)
        print(f"registered {source} with alias candidate at {tracking_uri}", flush=True)

        out = workdir / "out"
        flags = ["--skip-benchmark"] if args.skip_benchmark else ["--max-slowdown", args.max_slowdown]
        code = mlstep("optimize", f"models:/{args.name}@candidate", "--output", str(out), *flags,
                      env=env, cwd=workdir)
        if code not in (0, 1):               # 2/3: no report; the command said why on stderr
            return code
        report = json.loads((out / "report.json").read_text())
        fp32 = report["variants"]["fp32"]["registered"]
        print("registered variants: " + ", ".join(f"{n} {v['registered']}" for n, v in report["variants"].items()))
        if not fp32:
            print(f"the fp32 variant did not pass its gates (see {out / 'report.md'}); nothing to promote")
            return 1

        code = mlstep("promote", fp32, "--alias", "champion", env=env, cwd=workdir)
        if code != 0:
            return code

        import mlflow

        champion = mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(args.name, "champion")
        print(f"champion: models:/{args.name}/{champion.version} "
              f"(variant {champion.tags.get('mlstep.variant')}, gates {champion.tags.get('mlstep.gates')}, "
              f"source {champion.tags.get('mlstep.source')})")
        return 0
    finally:
        if args.workdir is None and not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        elif args.workdir is None:
            print(f"work folder kept: {workdir}")


if __name__ == "__main__":
    sys.exit(main())
