"""The seed's two latency tables on CUDA, in one command: bert-base over batch x sequence and GPT-2 124M with
past over batch x past length (one new token), fp32 and fp16, ONNX Runtime timed with IO binding.

Rows (engine / precision / batch), each timed in the same process on the same inputs:

- ``torch (eager)`` fp32 / fp16 (bert only: the GPT-2 rows time the ONNX graphs with past);
- ``onnxruntime (export)`` fp32: the exported model as it is (ORT's session-level optimizations on);
- ``onnxruntime (ORT optimizer)`` fp32 / fp16: ``onnxruntime.transformers.optimizer`` output, the peer;
- ``onnxruntime (mlstep)`` fp32 / fp16: mlstep's fully fused variants (``optimize_file`` + ``build_variants``);
- ``onnxruntime (mlstep, attention unfused)`` fp32 / fp16: the other form mlstep can emit (every fusion but
  attention), so the choice of form on this provider rests on a measurement.

A parity table compares each engine's first output with the export's at batch 4 x s=32 (bert) and batch 4 x
past=32 (GPT-2), max |diff| over the batch, in sessions without TF32 (``exact``: what the step's parity gate
uses); the timed sessions keep ONNX Runtime's defaults.

    python benchmarks/gpu_seed_tables.py --out gpu-tables        # CUDA (exit 2 when CUDA does not load)
    python benchmarks/gpu_seed_tables.py --dry-run --out /tmp/t  # tiny models on the CPU (the CI test)

The models are random-weight ``BertConfig()`` / ``GPT2Config()`` exported with the TorchScript exporter at
opset 17 and eager attention (the layout ONNX Runtime's optimizer fuses; mlstep fuses it and the sdpa/dynamo
layouts alike). Offline: nothing is downloaded. Writes ``tables.md`` and ``tables.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL = dict(batches=(1, 4, 8), columns=(8, 32, 128), warmup=10, repeat=50, parity_shape=(4, 32))
DRY = dict(batches=(1, 2), columns=(8, 16), warmup=1, repeat=3, parity_shape=(2, 8))
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
TINY_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=256)

EXPORT, PEER, MLSTEP, UNFUSED, TORCH = ("onnxruntime (export)", "onnxruntime (ORT optimizer)",
                                        "onnxruntime (mlstep)", "onnxruntime (mlstep, attention unfused)",
                                        "torch (eager)")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- models

def export_models(work: Path, dry: bool) -> dict[str, dict]:
    """bert-base and GPT-2 (with past), exported; each entry: path, torch model (bert), heads, hidden."""
    import transformers as tf

    from mlstep.export import build_gpt2, build_model, export_encoder, export_gpt2

    bert_cfg = tf.BertConfig(**(TINY_BERT if dry else {}))
    bert_cfg._attn_implementation = "eager"
    bert = build_model(bert_cfg)
    gpt2_cfg = tf.GPT2Config(**(TINY_GPT2 if dry else {}))
    gpt2_cfg._attn_implementation = "eager"
    gpt2 = build_gpt2(gpt2_cfg, lm_head=True)
    models = {}
    for name, export in (("bert", lambda p, e: export_encoder(bert, p, e, 17 if e == "torchscript" else 18)),
                         ("gpt2", lambda p, e: export_gpt2(gpt2, p, e, 17 if e == "torchscript" else 18,
                                                           with_past=True))):
        for exporter in ("torchscript", "dynamo"):      # TorchScript first; dynamo where it is gone
            path = work / name / exporter / "model.onnx"
            start = time.perf_counter()
            try:
                export(path, exporter)
            except Exception as err:
                log(f"{name}: the {exporter} export failed ({str(err).splitlines()[0][:200]})")
                continue
            log(f"{name}: exported with {exporter} in {time.perf_counter() - start:.1f} s")
            break
        else:
            continue
        cfg = bert_cfg if name == "bert" else gpt2_cfg
        models[name] = dict(path=path, exporter=exporter, torch=bert if name == "bert" else None,
                            heads=cfg.num_attention_heads, hidden=cfg.hidden_size)
    return models


def engines_for(name: str, info: dict, work: Path, use_gpu: bool) -> list[tuple[str, str, Path]]:
    """(engine, precision, model path) for every ONNX engine of one model; a peer or form that cannot be
    built is logged and left out."""
    engines = [(EXPORT, "fp32", info["path"])]
    for engine, folder, build in ((PEER, "ort-optimizer", _peer), (MLSTEP, "mlstep-fused", _mlstep_full),
                                  (UNFUSED, "mlstep-attention-unfused", _mlstep_unfused)):
        start = time.perf_counter()
        try:
            paths = build(name, info, work / name / folder, use_gpu)
        except Exception as err:
            log(f"{name}: {engine} failed ({str(err).splitlines()[0][:300]})")
            traceback.print_exc(limit=3)
            continue
        log(f"{name}: {engine} built in {time.perf_counter() - start:.1f} s: {fused_ops(paths['fp32'])}")
        engines += [(engine, precision, path) for precision, path in paths.items()]
    return engines


def _peer(name: str, info: dict, out: Path, use_gpu: bool) -> dict[str, Path]:
    from onnxruntime.transformers.optimizer import optimize_model

    out.mkdir(parents=True, exist_ok=True)
    model = optimize_model(str(info["path"]), model_type="bert" if name == "bert" else "gpt2",
                           num_heads=info["heads"], hidden_size=info["hidden"], opt_level=0, use_gpu=use_gpu)
    paths = {"fp32": out / "fp32.onnx", "fp16": out / "fp16.onnx"}
    model.save_model_to_file(str(paths["fp32"]))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(paths["fp16"]))
    return paths


def _mlstep(info: dict, out: Path, use_gpu: bool, disabled: frozenset[str]) -> dict[str, Path]:
    from mlstep.optimizer import OptimizeOptions, optimize_file
    from mlstep.variants import build_variants

    result = optimize_file(info["path"], OptimizeOptions(use_gpu=use_gpu, disabled_fusions=disabled))
    paths, _ = build_variants(result.model, ("fp32", "fp16"), out)
    return paths


def _mlstep_full(name, info, out, use_gpu):   # noqa: ARG001 (one signature for every builder)
    return _mlstep(info, out, use_gpu, frozenset())


def _mlstep_unfused(name, info, out, use_gpu):
    return _mlstep(info, out, use_gpu, frozenset({"attention"}))


def fused_ops(path: Path) -> str:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.domain == "com.microsoft" or node.op_type == "LayerNormalization":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items())) or "nothing fused"


# --------------------------------------------------------------------------------------- timing

def measure(name: str, info: dict, engines, settings: dict, providers: list[str]) -> tuple[list[dict], list[dict]]:
    """Median ms per (engine, precision, batch, column) and each engine's parity against the export."""
    import numpy as np

    from mlstep.bench.gates import shaped_feeds
    from mlstep.bench.latency import summarize, time_calls
    from mlstep.optimizer import io as model_io
    from mlstep.runtime import adapt_feeds, make_runner, run, session

    graph = model_io.load(info["path"])
    past = name == "gpt2"
    shapes = [(b, c) for b in settings["batches"] for c in settings["columns"]]
    feeds = {s: shaped_feeds(graph, s[0], 1 if past else s[1], s[1] if past else 0)[0] for s in shapes}
    parity_feed = shaped_feeds(graph, settings["parity_shape"][0], 1 if past else settings["parity_shape"][1],
                               settings["parity_shape"][1] if past else 0)[0]
    rows, parity, reference = [], [], None
    for engine, precision, path in engines:
        try:
            sess = session(path, providers)
        except Exception as err:
            log(f"{name}: {engine} {precision} does not load ({str(err)[:200]})")
            continue
        provider = sess.get_providers()[0]
        exact = session(path, providers, exact=True)       # parity in float32 (no TF32), as the step checks it
        first = next(iter(run(exact, parity_feed).values())).astype(np.float32)
        del exact
        if reference is None:
            reference = first
        parity.append(dict(model=name, engine=engine, precision=precision,
                           max_abs_diff=float(np.nanmax(np.abs(first - reference))),
                           finite=bool(np.isfinite(first).all())))
        for batch, col in shapes:
            call = make_runner(sess, adapt_feeds(sess, feeds[(batch, col)]))
            stats = summarize(time_calls(call, settings["warmup"], settings["repeat"]), provider)
            rows.append(dict(model=name, engine=engine, precision=precision, batch=batch, column=col,
                             median_ms=stats.median_ms, p90_ms=stats.p90_ms, provider=provider))
        log(f"{name}: timed {engine} {precision} on {provider}")
        del sess
    if info.get("torch") is not None:
        rows += time_torch(name, info["torch"], feeds, settings, providers)
    return rows, parity


def time_torch(name: str, model, feeds: dict, settings: dict, providers: list[str]) -> list[dict]:
    import torch

    from mlstep.bench.latency import summarize, time_calls

    device = "cuda" if providers[0].startswith("CUDA") and torch.cuda.is_available() else "cpu"
    rows = []
    for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):
        net = model.to(device).to(torch.float16 if precision == "fp16" else torch.float32)
        for (batch, col), feed in feeds.items():
            inputs = {k: torch.from_numpy(v).to(device) for k, v in feed.items()
                      if k in ("input_ids", "attention_mask", "token_type_ids")}

            def call():
                with torch.inference_mode():
                    net(**inputs)
                if device == "cuda":
                    torch.cuda.synchronize()

            stats = summarize(time_calls(call, settings["warmup"], settings["repeat"]), device)
            rows.append(dict(model=name, engine=TORCH, precision=precision, batch=batch, column=col,
                             median_ms=stats.median_ms, p90_ms=stats.p90_ms, provider=device))
    model.to("cpu").float()
    return rows


# --------------------------------------------------------------------------------------- tables

def table(name: str, rows: list[dict], columns: tuple[int, ...]) -> str:
    label = "past" if name == "gpt2" else "s"
    keys = list(dict.fromkeys((r["engine"], r["precision"], r["batch"]) for r in rows if r["model"] == name))
    cell = {(r["engine"], r["precision"], r["batch"], r["column"]): r["median_ms"] for r in rows}
    lines = ["| engine | precision | batch | " + " | ".join(f"{label}={c}" for c in columns) + " |",
             "|---|---|--:|" + "--:|" * len(columns)]
    for engine, precision, batch in sorted(keys, key=lambda k: (k[1] != "fp32", k[2], _ENGINE_ORDER.index(k[0]))):
        values = [cell.get((engine, precision, batch, c)) for c in columns]
        lines.append(f"| {engine} | {precision} | {batch} | "
                     + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


_ENGINE_ORDER = [TORCH, EXPORT, PEER, UNFUSED, MLSTEP]


def parity_table(parity: list[dict]) -> str:
    lines = ["| model | engine | precision | max abs diff vs export | finite |", "|---|---|---|--:|---|"]
    lines += [f"| {p['model']} | {p['engine']} | {p['precision']} | {p['max_abs_diff']:.2e} | {p['finite']} |"
              for p in parity]
    return "\n".join(lines)


def environment(providers: list[str]) -> dict:
    import onnxruntime as ort

    env = dict(onnxruntime=ort.__version__, providers=providers, python=sys.version.split()[0])
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models, a tiny grid, on the CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu-seed-tables"))
    args = parser.parse_args(argv)
    from mlstep.runtime import CPU, CUDA, cuda_loads

    if not args.dry_run:
        try:
            import torch  # noqa: F401  (loads the CUDA libraries ONNX Runtime's CUDA provider links against)
        except ImportError:
            pass
    if args.dry_run:
        providers = [CPU]
    elif cuda_loads():
        providers = [CUDA, CPU]
    else:
        print("gpu_seed_tables: CUDA does not load in ONNX Runtime here (use --dry-run for the CPU check)",
              file=sys.stderr)
        return 2
    settings = DRY if args.dry_run else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, parity, sections = [], [], []
    env = environment(providers)
    log(f"environment: {env}")
    with tempfile.TemporaryDirectory(prefix="gpu-seed-tables-") as work:
        models = export_models(Path(work), args.dry_run)
        for name, info in models.items():
            engines = engines_for(name, info, Path(work), use_gpu=not args.dry_run)
            model_rows, model_parity = measure(name, info, engines, settings, providers)
            rows += model_rows
            parity += model_parity
            title = ("bert-base (BertConfig())" if name == "bert" else "GPT-2 124M with past (GPT2Config()), "
                     "one new token") + f", {info['exporter']} export, median ms"
            sections.append(f"### {title}\n\n{table(name, rows, settings['columns'])}")
            print(f"\n{sections[-1]}\n", flush=True)
            _write(args.out, env, settings, rows, parity, sections, time.perf_counter() - start)
    sections.append(f"### parity (first output vs the export)\n\n{parity_table(parity)}")
    print(f"\n{sections[-1]}\n", flush=True)
    _write(args.out, env, settings, rows, parity, sections, time.perf_counter() - start)
    log(f"done in {time.perf_counter() - start:.0f} s; tables in {args.out}")
    return 0 if rows else 1


def _write(out: Path, env, settings, rows, parity, sections, seconds) -> None:
    header = (f"Measured on {env.get('gpu', 'CPU')} ({', '.join(env['providers'])}), onnxruntime "
              f"{env['onnxruntime']}, torch {env.get('torch', '-')}; ONNX Runtime with IO binding on CUDA; "
              f"{settings['warmup']} warm-up + {settings['repeat']} timed calls per cell; {seconds:.0f} s in all.")
    (out / "tables.md").write_text(header + "\n\n" + "\n\n".join(sections) + "\n")
    (out / "tables.json").write_text(json.dumps(dict(environment=env, settings={k: list(v) if isinstance(v, tuple)
                                                     else v for k, v in settings.items()},
                                                     rows=rows, parity=parity), indent=1))


if __name__ == "__main__":
    sys.exit(main())
