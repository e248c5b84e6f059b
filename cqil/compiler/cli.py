"""`cqil-compile MODEL --p P [plan flags] (--dry-run [--json] [--estimate HW] | -o ENGINE_DIR)`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cqil.cli_util import (ArgumentParser, add_hub_flags, add_logging_flags, add_plan_flags, configure_logging,
                           plan_from_args, run_main)
from cqil.compiler.estimate import DEFAULT_CONTEXT, auto_candidates, estimate, format_candidates, format_estimate
from cqil.compiler.hardware import NAMES as HARDWARE_NAMES
from cqil.compiler.hardware import hardware
from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.model.loader import build_meta_model
from cqil.passes import build_graph
from cqil.passes.partition import MAX_SEGMENT_BYTES
from cqil.plan import Plan


def describe(cfg: ModelConfig, plan: Plan, source: str) -> dict:
    return {
        "architecture": cfg.architecture,
        "num_layers": cfg.num_layers,
        "p": plan.p,
        "start": plan.start,
        "end": plan.end,
        "bypass": plan.bypass,
        "bypass_semantics": plan.semantics,
        "replicate_outer": plan.replicate_outer,
        "plan_source": source,
        "groups": [list(g) for g in plan.groups],
        "rank_of_layer": {str(l): plan.rank_of(l) for l in range(cfg.num_layers) if plan.in_range(l)},
        "outer_layers": [l for l in range(cfg.num_layers) if not plan.in_range(l)],
        "outer_ranks": list(range(plan.p)) if plan.replicate_outer else [0],
        "original_depth": cfg.num_layers,
        "sequential_depth": plan.depth,
        "collectives": plan.collectives(),
        "plan": plan.to_dict(),
    }


def _ranges(layers: list[int]) -> str:
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(f"{layers[i]}" if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


def format_description(d: dict, model: str) -> str:
    lines = [f"model: {model} ({d['architecture']}, {d['num_layers']} layers)",
             f"plan ({d['plan_source']}): p={d['p']}, range [{d['start']}, {d['end']}), "
             f"bypass d={d['bypass']}" + (f" ({d['bypass_semantics']})" if d["bypass"] else "")]
    if d["groups"]:
        lines.append(f"groups ({len(d['groups'])}), layer:rank")
        for k, g in enumerate(d["groups"]):
            lines.append(f"  group {k:>3}: " + "  ".join(f"{l}:r{d['rank_of_layer'][str(l)]}" for l in g))
    else:
        lines.append("groups: none (the model runs unchanged)")
    ranks = "every rank" if d["replicate_outer"] else "rank 0"
    lines.append(f"outer layers {_ranges(d['outer_layers'])}: {ranks}")
    lines.append(f"sequential depth: {d['original_depth']} -> {d['sequential_depth']}")
    kinds = {}
    for c in d["collectives"]:
        kinds[c.split("[")[0]] = kinds.get(c.split("[")[0], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
    lines.append(f"collectives per forward pass: {len(d['collectives'])} ({summary})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cqil-compile",
        description="Compile a LLaMA-family HuggingFace checkpoint into a CQIL engine directory.")
    parser.add_argument("model", help="HuggingFace checkpoint: a local folder or a hub id (org/name)")
    add_hub_flags(parser)
    add_plan_flags(parser, p_auto_help="'auto' (with --estimate): the p with the best predicted latency")
    parser.add_argument("-o", "--output", help="engine directory to write")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weight and activation dtype of the engine (default auto: the checkpoint's torch_dtype, "
                             "float32 when it gives none)")
    parser.add_argument("--max-seq-len", type=int, help="longest prompt + generation (default: max_position_embeddings)")
    parser.add_argument("--adapter", help="LoRA adapter folder (cqil-finetune) to merge before export")
    parser.add_argument("--allow-plan-mismatch", action="store_true",
                        help="merge an adapter even if it was trained for another plan")
    parser.add_argument("--max-segment-mb", type=float, default=MAX_SEGMENT_BYTES / 2**20,
                        help="cut segments so that each holds at most this many MiB of weights, at layer "
                             f"boundaries (default {MAX_SEGMENT_BYTES // 2**20}; 0: cut at collectives only)")
    parser.add_argument("--formats", default="onnx",
                        help="comma-separated: onnx (always), torch (per-rank safetensors for the torch backend), "
                             "tensorrt (same as --backend tensorrt), aoti (AOTInductor packages for the aoti backend "
                             "and the C++ runtime, docs/cpp.md)")
    parser.add_argument("--devices", choices=["cpu", "cuda"], default="cpu",
                        help="with --formats ...,aoti: compile the AOTInductor packages for cpu (default) or cuda "
                             "(needs a CUDA machine)")
    parser.add_argument("--aoti-autotune", action="store_true",
                        help="with --formats ...,aoti: Inductor freezing + max_autotune (slower build, faster CPU "
                             "GEMMs; for release builds on an idle machine of the target CPU)")
    parser.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                        help="tensorrt: also build a TensorRT plan per segment on this machine's GPU")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="largest batch the TensorRT plans and AOTInductor packages accept (default 8)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="keep the plain ONNX graph (default: ONNX Runtime's fused attention and norms, and a KV "
                             "cache written in place)")
    parser.add_argument("--quant", choices=["int4", "int8"], help="weight-only quantization of the ONNX segments")
    parser.add_argument("--quant-block", type=int, default=32, help="weights per quantization block (default 32)")
    parser.add_argument("--quant-asymmetric", action="store_true", help="a zero point per block (default symmetric)")
    parser.add_argument("--no-quant-lm-head", action="store_true", help="keep the LM head in float")
    parser.add_argument("--quant-embedding", action="store_true", help="quantize the embedding too")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object")
    parser.add_argument("--estimate", metavar="HW", help="with --dry-run: predicted decode ms/token, sequential vs "
                        f"the plan, on one of {', '.join(HARDWARE_NAMES)} (cpu: this machine, measured now)")
    parser.add_argument("--estimate-batch", type=int, default=1, help="batch of the estimate (default 1)")
    parser.add_argument("--estimate-context", type=int, default=DEFAULT_CONTEXT,
                        help=f"tokens already in the KV cache for the estimate (default {DEFAULT_CONTEXT})")
    add_logging_flags(parser)
    return parser


def _formats(args) -> tuple[str, ...]:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.backend == "tensorrt":
        formats.append("tensorrt")
    return tuple(dict.fromkeys(["onnx", *formats]))


def _quantization(args):
    from cqil.exporters.quantize import Quantization

    if args.quant is None:
        if args.quant_asymmetric or args.no_quant_lm_head or args.quant_embedding or args.quant_block != 32:
            raise CqilError("the --quant-* flags go with --quant int4|int8")
        return None
    return Quantization(args.quant, block=args.quant_block, symmetric=not args.quant_asymmetric,
                        lm_head=not args.no_quant_lm_head, embedding=args.quant_embedding)


def main(argv=None) -> int:
    from cqil.model.hub import resolve_model

    args = build_parser().parse_args(argv)
    configure_logging(args, "cqil-compile")
    model = resolve_model(args.model, args.revision, args.cache_dir)
    cfg = ModelConfig.from_dir(model)
    hw = candidates = None
    if args.estimate is not None or args.p == "auto":
        if args.estimate is None:
            raise CqilError("--p auto needs --estimate HW: it picks the p with the best predicted latency on HW")
        if not args.dry_run:
            raise CqilError("--estimate and --p auto go with --dry-run (they predict, they write nothing)")
        hw = hardware(args.estimate)
        est_kw = dict(batch=args.estimate_batch, context=args.estimate_context, dtype=args.dtype)
    if args.p == "auto":
        candidates = auto_candidates(cfg, hw, start=args.start, end=args.end, bypass=args.bypass,
                                     semantics=args.bypass_semantics, replicate_outer=args.replicate_outer, **est_kw)
        plan, source = candidates[0].plan, f"--p auto: {candidates[0].source}, best predicted on {hw.name}"
    else:
        plan, source = plan_from_args(cfg, args)
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise CqilError(f"--max-seq-len must be a positive integer, got {args.max_seq_len}")
    if not args.dry_run:
        if not args.output:
            raise CqilError("give -o ENGINE_DIR (or --dry-run to only print the plan)")
        from cqil.compiler.compile import compile_model

        formats = _formats(args)
        if "aoti" not in formats and (args.devices != "cpu" or args.aoti_autotune):
            raise CqilError("--devices and --aoti-autotune go with --formats ...,aoti (they choose how the "
                            "AOTInductor packages are compiled)")

        compile_model(model, args.output, plan=plan, plan_source=source, dtype=args.dtype, max_seq_len=args.max_seq_len,
                      force=args.force, adapter=args.adapter, allow_plan_mismatch=args.allow_plan_mismatch,
                      progress=not (args.no_progress or args.quiet), formats=formats, max_batch=args.max_batch,
                      max_segment_bytes=int(args.max_segment_mb * 2**20) or None, devices=args.devices,
                      aoti_autotune=args.aoti_autotune, fuse=not args.no_fuse, quant=_quantization(args))
        return 0
    cfg.check_sequence_length(cfg.max_position_embeddings if args.max_seq_len is None else args.max_seq_len)
    t0 = time.perf_counter()
    gm = build_graph(build_meta_model(cfg), plan)  # checks the plan against the real graph, no weights
    d = describe(cfg, plan, source)
    d["graph_nodes"] = len(gm.graph.nodes)
    d["trace_seconds"] = round(time.perf_counter() - t0, 3)
    est = None
    if hw is not None:
        est = candidates[0].estimate if candidates else estimate(cfg, plan, hw, **est_kw)
        d["estimate"] = est.to_dict()
        if candidates:
            d["estimate"]["candidates"] = [
                {"p": c.plan.p, "start": c.plan.start, "end": c.plan.end, "bypass": c.plan.bypass,
                 "depth": c.plan.depth, "source": c.source, "plan_ms": round(c.estimate.plan_ms, 4),
                 "latency_reduction": round(c.estimate.latency_reduction, 4)} for c in candidates]
    if args.json:
        print(json.dumps(d))
    else:
        print(format_description(d, args.model))
        if est is not None:
            print(format_estimate(est))
        if candidates:
            print(format_candidates(candidates))
    return 0


def entry():
    sys.exit(run_main("cqil-compile", main))


if __name__ == "__main__":
    entry()
