"""Fusion matrix (issue 2, item 10a): mlstep vs ORT's transformers optimizer vs onnxscript ort_fusions.

{bert, distilbert, roberta, albert} x {torchscript 14, torchscript 17, dynamo 18} x {eager, sdpa}, tiny
random-weight configs (2 layers, hidden 32, 4 heads). Each optimizer runs in its own subprocess (with a
timeout) so that a crash or a hang of a peer becomes one short line in its cell. Parity: fp32, original
under ORT_DISABLE_ALL vs candidate, batches with no padding, right padding and left padding.

    .venv/bin/python benchmarks/fusion_matrix.py [--families bert,albert] [--out results.md]
    .venv/bin/python benchmarks/fusion_matrix.py --tf      # TF/Keras rows from tests/tf_fixtures (no TF needed)
    .venv/bin/python benchmarks/fusion_matrix.py --gpt2    # GPT-2 rows (GPT2Model, GPT2LMHeadModel, distilgpt2, with past)
    .venv/bin/python benchmarks/fusion_matrix.py --corpus  # the corpus: Optimum fixtures (tests/corpus/optimum)
                                                           # + a random-sweep slice; peers incl. Optimum O2/O3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "corpus"))   # corpus_contract, sweep

from _common import compact, fmt_parity, op_counts, run_json_subprocess, short_error  # noqa: E402

FAMILIES = ("bert", "distilbert", "roberta", "albert")
LAYOUTS = (("torchscript", 14), ("torchscript", 17), ("dynamo", 18))
ATTENTIONS = ("eager", "sdpa")
PEERS = ("mlstep", "ort", "onnxscript")
LAYERS, HEADS, HIDDEN = 2, 4, 32
PEER_TIMEOUT = 300


# --------------------------------------------------------------------------------------------- worker
def _worker(peer: str, model: str, out: str, model_type: str = "bert", heads: int = HEADS, past: int = 0,
            hidden: int = HIDDEN, expect: dict | None = None) -> dict:
    """Optimize ``model`` with ``peer``, save to ``out``, count fused ops and check parity. Peer ``given``: ``out``
    was optimized elsewhere (Optimum's ORTOptimizer in its own environment); only count and check it. With
    ``expect`` (a corpus_contract.Expect as a dict): parity on the corpus cases and the full-fusion verdict."""
    result: dict = {}
    try:
        if peer == "given":
            if not Path(out).exists():
                raise FileNotFoundError(out)
        elif peer == "mlstep":
            from mlstep.optimizer import OptimizeOptions, optimize_file
            from mlstep.optimizer.io import save

            r = optimize_file(model, OptimizeOptions(verbose=True))
            save(r.model, out)
            refused = []
            for entry in r.log:
                for reason in entry.refused:
                    line = f"{entry.name}: {reason}"
                    if line not in refused:
                        refused.append(line)
            result["refused"] = refused
        elif peer == "ort":
            import logging

            from onnxruntime.transformers import optimizer

            logging.disable(logging.WARNING)
            m = optimizer.optimize_model(model, model_type=model_type, num_heads=heads, hidden_size=hidden,
                                         opt_level=0)
            result["ort_stats"] = {k: v for k, v in m.get_fused_operator_statistics().items() if v}
            m.save_model_to_file(out)
        elif peer == "onnxscript":
            import onnx_ir as ir
            from onnxscript.rewriter.ort_fusions import optimize_for_ort

            m = ir.load(model)
            m, stats = optimize_for_ort(m)
            result["stats"] = {k: v for k, v in stats.items() if v}
            ir.save(m, out)
        else:
            raise ValueError(peer)
    except Exception as err:  # a peer's failure is a table cell, not a crash
        return {"error": short_error(f"{type(err).__name__}: {err}")}
    result["counts"] = dict(op_counts(out))
    try:
        import onnx_ir as ir
        from mlstep.validate import check_parity, synthesize_inputs

        if expect is None:
            cases = synthesize_inputs(ir.load(model), past_sequence=past)
        else:
            from corpus_contract import Expect, parity_cases, violations

            cases = parity_cases(ir.load(model), Expect(**expect))
            result["violations"] = violations(ir.load(out), Expect(**expect))
        p = check_parity(model, out, "fp32", cases)
        result["parity"] = {"max_abs_diff": p.max_abs_diff, "passed": p.passed, "worst_case": p.worst_case}
    except Exception as err:
        result["parity_error"] = short_error(f"{type(err).__name__}: {err}")
    return result


# --------------------------------------------------------------------------------------------- checks
def fully_fused(family: str, counts: dict[str, int], layers: int = LAYERS) -> tuple[bool, str]:
    """Attention per layer, one embedding fusion, 2 (Skip)LayerNorms per layer, a Gelu per layer."""
    att = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)
    eln = counts.get("EmbedLayerNormalization", 0)
    sln = counts.get("SkipLayerNormalization", 0)
    ln = counts.get("LayerNormalization", 0)
    gelu = counts.get("Gelu", 0) + counts.get("BiasGelu", 0) + counts.get("FastGelu", 0)
    missing = []
    if att != layers:
        missing.append(f"Att {att}/{layers}")
    # BERT/DistilBERT: EmbedLayerNormalization required. RoBERTa (cumsum position ids) and ALBERT
    # (embedding_size != hidden, projection after the LayerNorm) may end in a plain LayerNormalization.
    if eln == 1:
        layer_ln = ln
    elif family in ("roberta", "albert") and ln >= 1:
        layer_ln = ln - 1
    else:
        layer_ln = ln
        missing.append("ELN 0/1")
    if sln + layer_ln != 2 * layers or sln == 0:
        missing.append(f"SLN+LN {sln}+{layer_ln}/{2 * layers}")
    if gelu != layers:
        missing.append(f"Gelu {gelu}/{layers}")
    return (not missing, ", ".join(missing))


def cell(res: dict) -> tuple[str, str]:
    if "error" in res:
        return f"error: {res['error']}", "-"
    par = fmt_parity(res.get("parity")) if "parity" in res else f"error: {res.get('parity_error')}"
    if res.get("parity") and not res["parity"]["passed"]:
        par += f" ({res['parity']['worst_case']})"
    return compact(res.get("counts", {})), par


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--layouts", default="ts14,ts17,dynamo18", help="subset of ts14,ts17,dynamo18")
    ap.add_argument("--attention", default="eager,sdpa")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--out", help="also write the markdown table (and refusal notes) to this file")
    ap.add_argument("--json", help="write raw per-cell results as JSON")
    ap.add_argument("--tf", action="store_true", help="the TF/Keras rows instead: the committed tf2onnx fixtures "
                    "(tests/tf_fixtures), ORT with model_type bert_tf / bert_keras")
    ap.add_argument("--_worker", nargs=3, metavar=("PEER", "MODEL", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--_model-type", default="bert", help=argparse.SUPPRESS)
    ap.add_argument("--_heads", type=int, default=HEADS, help=argparse.SUPPRESS)
    ap.add_argument("--gpt2", action="store_true", help="the GPT-2 rows instead: GPT2Model, GPT2LMHeadModel, "
                    "distilgpt2 (6 layers), gpt2-with-past; ORT with model_type gpt2; parity with past at past 4")
    ap.add_argument("--_past", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", action="store_true", help="the corpus rows instead: every Optimum fixture "
                    "(tests/corpus/optimum) and the always-on random-sweep slice; peers mlstep, ORT, Optimum "
                    "ORTOptimizer O2/O3 (in the Optimum environment, --optimum-venv) and onnxscript")
    ap.add_argument("--optimum-venv", default=os.environ.get("MLSTEP_OPTIMUM_VENV", "/work/.venvs/optimum"))
    ap.add_argument("--sweep-seeds", default=None, help="comma-separated sweep seeds (default: the always-on "
                    "slice; 'none' for no sweep rows)")
    ap.add_argument("--cells", default=None, help="the Optimum fixtures whose name contains one of these "
                    "comma-separated strings (default: all)")
    ap.add_argument("--_hidden", type=int, default=HIDDEN, help=argparse.SUPPRESS)
    ap.add_argument("--_expect", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        print(json.dumps(_worker(*args._worker, model_type=args._model_type, heads=args._heads, past=args._past,
                                 hidden=args._hidden, expect=json.loads(args._expect) if args._expect else None)))
        return 0
    if args.corpus:
        return corpus_rows(args)
    if args.gpt2:
        return gpt2_rows(args)
    if args.tf:
        return tf_rows(args)

    import logging
    import warnings

    logging.disable(logging.WARNING)  # torch.onnx's registration chatter
    warnings.simplefilter("ignore")
    from mlstep.export import ExportSpec, export_spec

    names = {"ts14": ("torchscript", 14), "ts17": ("torchscript", 17), "dynamo18": ("dynamo", 18)}
    layouts = [names[x] for x in args.layouts.split(",")]
    peers = args.peers.split(",")
    rows, raw, notes = [], {}, []
    header = ["model", "exporter", "attn", "mlstep fused", "mlstep parity", "fully fused",
              "ORT fused", "ORT parity", "onnxscript fused", "onnxscript parity"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlstep-matrix-") as tmp:
        for family in args.families.split(","):
            for exporter, opset in layouts:
                for attention in args.attention.split(","):
                    spec = ExportSpec(family, exporter, opset, attention)
                    src = Path(tmp) / spec.key / "model.onnx"
                    try:
                        export_spec(spec, src)
                    except Exception as err:
                        rows.append([family, f"{exporter} {opset}", attention, f"export failed: "
                                     f"{short_error(str(err))}"] + ["-"] * 6)
                        continue
                    res = {}
                    for peer in PEERS:
                        if peer not in peers:
                            res[peer] = {"error": "skipped"}
                            continue
                        out = Path(tmp) / spec.key / peer / "model.onnx"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        res[peer] = run_json_subprocess([__file__, "--_worker", peer, str(src), str(out)],
                                                        PEER_TIMEOUT)
                    raw[spec.key] = res
                    m_fused, m_par = cell(res["mlstep"])
                    ok, why = fully_fused(family, res["mlstep"].get("counts", {})) \
                        if "counts" in res["mlstep"] else (False, "error")
                    o_fused, o_par = cell(res["ort"])
                    s_fused, s_par = cell(res["onnxscript"])
                    rows.append([family, f"{exporter} {opset}", attention, m_fused, m_par,
                                 "yes" if ok else f"no ({why})", o_fused, o_par, s_fused, s_par])
                    if not ok and res["mlstep"].get("refused"):
                        notes.append(f"- {spec.key}: " + "; ".join(res["mlstep"]["refused"][:6]))
                    print(f"[{time.perf_counter() - start:6.0f}s] {spec.key}: mlstep {m_fused} {m_par}",
                          file=sys.stderr, flush=True)

    n_ok = sum(1 for r in rows if r[5] == "yes" and r[4].endswith("pass"))
    footer = [f"mlstep fully fused with parity: {n_ok}/{len(rows)} cells "
              f"(tiny configs: {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads; {time.perf_counter() - start:.0f} s)",
              "Legend: Att=Attention MHA=MultiHeadAttention ELN=EmbedLayerNormalization "
              "SLN=SkipLayerNormalization LN=LayerNormalization BG=BiasGelu G=Gelu FG=FastGelu; "
              "parity = max |diff| over no/right/left-padded batches, fp32 atol 1e-4 + rtol 1e-3"]
    return _publish(args, header, rows, footer, notes, "cells", raw)


def _publish(args, header, rows, footer, notes, what, raw) -> int:
    """Print the markdown table with its footer (and mlstep's refusals); write --out / --json when asked."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *footer]
    if notes:
        lines += ["", f"mlstep refusals (verbose) for {what} not fully fused:"] + notes
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


TF_FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "tf_fixtures"


def tf_rows(args) -> int:
    """TF BERT (tf2onnx from_function) and Keras BERT (from_keras) rows from the committed fixtures."""
    import re

    peers = args.peers.split(",")
    header = ["model", "exporter", "fixture", "mlstep fused", "mlstep parity", "fully fused",
              "ORT fused", "ORT parity", "onnxscript fused", "onnxscript parity"]
    rows, raw, notes = [], {}, []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlstep-matrix-tf-") as tmp:
        for src in sorted(TF_FIXTURES.glob("*.onnx")):
            model_type = "bert_keras" if src.name.startswith("bert_keras") else "bert_tf"
            heads = int(re.search(r"_h(\d+)_", src.name).group(1))
            opset = re.search(r"_op(\d+)_", src.name).group(1)
            exporter = f"tf2onnx {'from_keras' if model_type == 'bert_keras' else 'from_function'} {opset}"
            res = {}
            for peer in PEERS:
                if peer not in peers:
                    res[peer] = {"error": "skipped"}
                    continue
                out = Path(tmp) / src.stem / peer / "model.onnx"
                out.parent.mkdir(parents=True, exist_ok=True)
                res[peer] = run_json_subprocess([__file__, "--_worker", peer, str(src), str(out), "--_model-type",
                                                 model_type, "--_heads", str(heads)], PEER_TIMEOUT)
            raw[src.stem] = res
            m_fused, m_par = cell(res["mlstep"])
            ok, why = fully_fused("bert", res["mlstep"].get("counts", {})) if "counts" in res["mlstep"] \
                else (False, "error")
            o_fused, o_par = cell(res["ort"])
            s_fused, s_par = cell(res["onnxscript"])
            rows.append([model_type, exporter, re.sub(r"^.*?_op\d+_", "", src.stem), m_fused, m_par,
                         "yes" if ok else f"no ({why})", o_fused, o_par, s_fused, s_par])
            if not ok and res["mlstep"].get("refused"):
                notes.append(f"- {src.stem}: " + "; ".join(res["mlstep"]["refused"][:6]))
            print(f"[{time.perf_counter() - start:6.0f}s] {src.stem}: mlstep {m_fused} {m_par}", file=sys.stderr,
                  flush=True)
    versions = (TF_FIXTURES / "VERSIONS.txt").read_text().split()
    n_ok = sum(1 for r in rows if r[5] == "yes" and r[4].endswith("pass"))
    footer = [f"mlstep fully fused with parity: {n_ok}/{len(rows)} TF/Keras fixtures ({LAYERS} layers, hidden "
              f"{HIDDEN}; fixture = opset, heads, token types, id dtype; made with "
              f"{', '.join(v for v in versions if '==' in v and not v.startswith('python'))}; "
              f"{time.perf_counter() - start:.0f} s)",
              "ORT runs with model_type bert_tf / bert_keras and the fixture's head count; parity = max |diff| over "
              "no/right/left-padded batches, fp32 atol 1e-4 + rtol 1e-3"]
    return _publish(args, header, rows, footer, notes, "fixtures", raw)


# --------------------------------------------------------------------------------------------- GPT-2
# row -> (variant, n_layer, lm_head, with_past); variants as in tests/conftest.py
GPT2_ROWS = {"gpt2 GPT2Model": (2, False, False), "gpt2 GPT2LMHeadModel": (2, True, False),
             "distilgpt2": (6, True, False), "gpt2-with-past": (2, True, True)}
GPT2_LAYOUTS = (("torchscript", 14), ("dynamo", 18))
GPT2_PAST = 4


def gpt2_fully_fused(counts: dict[str, int], layers: int) -> tuple[bool, str]:
    """Causal attention per layer, FastGelu (or Gelu) per layer, 2 SkipLayerNorm per layer + the final norm."""
    att = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)
    gelu = counts.get("FastGelu", 0) + counts.get("Gelu", 0) + counts.get("BiasGelu", 0)
    sln, ln = counts.get("SkipLayerNormalization", 0), counts.get("LayerNormalization", 0)
    missing = []
    if att != layers:
        missing.append(f"Att {att}/{layers}")
    if gelu != layers:
        missing.append(f"Gelu {gelu}/{layers}")
    if not (sln == 2 * layers + 1 or (sln == 2 * layers and ln == 1)):
        missing.append(f"SLN+LN {sln}+{ln}/{2 * layers}+1")
    return (not missing, ", ".join(missing))


def gpt2_rows(args) -> int:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    from mlstep.export import build_gpt2, export_gpt2, tiny_gpt2_config

    peers = args.peers.split(",")
    header = ["model", "exporter", "attn", "mlstep fused", "mlstep parity", "fully fused",
              "ORT fused", "ORT parity", "onnxscript fused", "onnxscript parity"]
    rows, raw, notes = [], {}, []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlstep-matrix-gpt2-") as tmp:
        for row, (layers, lm_head, with_past) in GPT2_ROWS.items():
            for exporter, opset in GPT2_LAYOUTS:
                for attention in args.attention.split(","):
                    key = f"{row.replace(' ', '-')}-{exporter}{opset}-{attention}"
                    src = Path(tmp) / key / "model.onnx"
                    try:
                        model = build_gpt2(tiny_gpt2_config(attention, n_layer=layers), lm_head=lm_head)
                        export_gpt2(model, src, exporter, opset, with_past=with_past)
                    except Exception as err:
                        rows.append([row, f"{exporter} {opset}", attention,
                                     f"export failed: {short_error(str(err))}"] + ["-"] * 6)
                        continue
                    past = GPT2_PAST if with_past else 0
                    res = {}
                    for peer in PEERS:
                        if peer not in peers:
                            res[peer] = {"error": "skipped"}
                            continue
                        out = Path(tmp) / key / peer / "model.onnx"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        res[peer] = run_json_subprocess(
                            [__file__, "--_worker", peer, str(src), str(out), "--_model-type", "gpt2",
                             "--_heads", str(HEADS), "--_past", str(past)], PEER_TIMEOUT)
                    raw[key] = res
                    m_fused, m_par = cell(res["mlstep"])
                    ok, why = gpt2_fully_fused(res["mlstep"]["counts"], layers) if "counts" in res["mlstep"] \
                        else (False, "error")
                    o_fused, o_par = cell(res["ort"])
                    s_fused, s_par = cell(res["onnxscript"])
                    rows.append([row, f"{exporter} {opset}", attention, m_fused, m_par,
                                 "yes" if ok else f"no ({why})", o_fused, o_par, s_fused, s_par])
                    if not ok and res["mlstep"].get("refused"):
                        notes.append(f"- {key}: " + "; ".join(res["mlstep"]["refused"][:6]))
                    print(f"[{time.perf_counter() - start:6.0f}s] {key}: mlstep {m_fused} {m_par}", file=sys.stderr,
                          flush=True)
    n_ok = sum(1 for r in rows if r[5] == "yes" and r[4].endswith("pass"))
    footer = [f"mlstep fully fused with parity: {n_ok}/{len(rows)} GPT-2 cells (tiny: n_embd {HIDDEN}, {HEADS} "
              f"heads, 2 layers, distilgpt2 6 layers; {time.perf_counter() - start:.0f} s)",
              "ORT runs with model_type gpt2; parity = max |diff| over every output (logits/last_hidden_state and "
              f"every present) on batch 2, sequence 8, no/right/left padding; with past: past length {GPT2_PAST}, "
              "the mask spanning past + current tokens. Legend: MHA=MultiHeadAttention FG=FastGelu "
              "SLN=SkipLayerNormalization LN=LayerNormalization"]
    return _publish(args, header, rows, footer, notes, "cells", raw)


# --------------------------------------------------------------------------------------------- corpus
CORPUS = Path(__file__).resolve().parent.parent / "tests" / "corpus"
CORPUS_PEERS = ("mlstep", "ort", "optimum-O2", "optimum-O3", "onnxscript")


def corpus_rows(args) -> int:
    """Optimum fixtures + a sweep slice: fused ops, full-fusion verdict (corpus_contract) and fp32 parity on
    the corpus cases (batch 3, right/left padding, sequence 8 and 72; with past: past 1/17/64) per peer."""
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    from corpus_contract import LONG, PAST_STEPS, SHORT
    from corpus_sweep import config_of, draw, export
    from test_random_sweep import ALWAYS_SEEDS

    peers = [p for p in args.peers.split(",") if p in CORPUS_PEERS] if args.peers != ",".join(PEERS) \
        else list(CORPUS_PEERS)
    optimum_python = Path(args.optimum_venv) / "bin" / "python"
    manifest = json.loads((CORPUS / "optimum" / "manifest.json").read_text())
    seeds = list(ALWAYS_SEEDS) if not args.sweep_seeds else [] if args.sweep_seeds == "none" else \
        [int(x) for x in args.sweep_seeds.split(",")]
    header = ["cell", "L", "heads"] + [f"{p} {what}" for p in peers for what in ("fused", "parity")]
    rows, raw, notes = [], {}, []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlstep-matrix-corpus-") as tmp:
        cells = []   # (key, source path, expect dict, model_type, heads, hidden, optimum config args)
        for name, e in manifest["files"].items():
            if args.cells and not any(c in name for c in args.cells.split(",")):
                continue
            expect = {"family": e["family"], "task": e["task"], "layers": e["layers"], "vocab": e["vocab"],
                      "has_past": e["has_past"]}
            cells.append((name.removesuffix(".onnx"), CORPUS / "optimum" / name, expect,
                          "gpt2" if e["model_type"] == "gpt2" else "bert",
                          e["heads"], e["hidden"], ["--fixture", e["family"], e["task"]]))
        for seed in seeds:
            cfg = draw(seed)
            src = Path(tmp) / cfg.id / "model.onnx"
            try:
                export(cfg, src)
            except Exception as err:
                rows.append([cfg.id, str(cfg.layers), str(cfg.heads), f"export failed: {short_error(str(err))}"]
                            + ["-"] * (2 * len(peers) - 1))
                continue
            config_json = Path(tmp) / cfg.id / "config.json"
            config_of(cfg).to_json_file(config_json)
            expect = {"family": cfg.family, "task": cfg.contract_task, "layers": cfg.layers, "vocab": cfg.vocab,
                      "has_past": cfg.with_past}
            cells.append((cfg.id, src, expect, "gpt2" if cfg.family == "gpt2" else "bert", cfg.heads, cfg.hidden,
                          ["--config", str(config_json)]))
        for key, src, expect, model_type, heads, hidden, optimum_args in cells:
            res = {}
            levels = [p.split("-")[1] for p in peers if p.startswith("optimum-")]
            if levels:   # one Optimum process for every level; its outputs are checked here, in-process
                made = _run_optimum(optimum_python, levels, src, Path(tmp) / key / "optimum", optimum_args) \
                    if optimum_python.exists() else {"error": f"no Optimum environment at {args.optimum_venv}"}
                for level in levels:
                    out = made.get(level, made)
                    res[f"optimum-{level}"] = out if isinstance(out, dict) else \
                        _worker("given", str(src), out, expect=expect)
            for peer in peers:
                if peer.startswith("optimum-"):
                    continue
                out = Path(tmp) / key / peer / "model.onnx"
                out.parent.mkdir(parents=True, exist_ok=True)
                res[peer] = run_json_subprocess(
                    [__file__, "--_worker", peer, str(src), str(out), "--_model-type", model_type,
                     "--_heads", str(heads), "--_hidden", str(hidden), "--_expect", json.dumps(expect)],
                    PEER_TIMEOUT)
            raw[key] = res
            row = [key, str(expect["layers"]), str(heads)]
            for peer in peers:
                fused, par = cell(res[peer])
                if "violations" in res[peer]:
                    fused += " (full)" if not res[peer]["violations"] else " (partial)"
                row += [fused, par]
            rows.append(row)
            m = res.get("mlstep", {})
            if m.get("violations"):
                notes.append(f"- {key}: {'; '.join(m['violations'])}; mlstep says: "
                             + "; ".join(m.get("refused", [])[:3]))
            print(f"[{time.perf_counter() - start:6.0f}s] {key}: " + " | ".join(
                f"{p} {cell(res[p])[0]} {cell(res[p])[1]}" for p in peers), file=sys.stderr, flush=True)

    def full_with_parity(peer: str) -> int:
        return sum(1 for r in raw.values() if not r.get(peer, {}).get("violations", ["x"])
                   and r[peer].get("parity", {}).get("passed"))

    versions = manifest["versions"]
    footer = ["Fully fused (corpus contract) with fp32 parity: " + ", ".join(
                  f"{p} {full_with_parity(p)}/{len(raw)}" for p in peers)
              + f" ({time.perf_counter() - start:.0f} s)",
              f"Cells: {sum(1 for c in cells if c[-1][0] == '--fixture')} Optimum fixtures (optimum-onnx {versions['optimum-onnx']}, transformers "
              f"{versions['transformers']}, torch {versions['torch']}) + sweep seeds {seeds} (torch 2.13 exports of "
              "transformers 5 configs). '(full)': Attention/MHA per layer, no Softmax/Erf, Tanh only in a "
              "classification head, SkipLayerNorm >= 2L-1, EmbedLayerNorm for encoders.",
              f"Parity: fp32 vs the original under ORT_DISABLE_ALL, batch 3, no/right/left padding, sequence {SHORT} "
              f"and {LONG} (with past: (past, new) in {list(PAST_STEPS)}); atol 1e-4 + rtol 1e-3. ORT optimizer: "
              "model_type bert/gpt2 with the cell's heads and hidden, opt_level 0. Optimum: ORTOptimizer with "
              "AutoOptimizationConfig O2 / O3 (O3 adds the Gelu approximation) in the pinned Optimum environment."]
    return _publish(args, header, rows, footer, notes, "cells", raw)


def _run_optimum(python: Path, levels: list[str], src: Path, out_dir: Path, config_args: list[str]) -> dict:
    """Optimum's ORTOptimizer at each level, in its own environment (benchmarks/_optimum_optimizer.py):
    level -> output path, or {"error": ...}."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1",
                                                                         "TRANSFORMERS_OFFLINE": "1"}
    script = Path(__file__).resolve().parent / "_optimum_optimizer.py"
    try:
        proc = subprocess.run([str(python), str(script), ",".join(levels), str(src), str(out_dir), *config_args],
                              capture_output=True, text=True, timeout=PEER_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {PEER_TIMEOUT} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            made = json.loads(line)
            return {k: {"error": short_error(v["error"])} if isinstance(v, dict) else v for k, v in made.items()}
    return {"error": short_error(proc.stderr or f"exit {proc.returncode}")}

if __name__ == "__main__":
    sys.exit(main())
