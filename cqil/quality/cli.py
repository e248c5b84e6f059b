"""`cqil-analyze`, `cqil-finetune`, `cqil-eval`: measure, repair and check CQIL's quality.

    cqil-analyze MODEL --data FILE [--p P] [--threshold T] [--device D] [--json] [--plot out.png]
    cqil-finetune MODEL --p P [plan flags] --data FILE -o ADAPTER_DIR [training flags]   (cqil.quality.finetune)
    cqil-eval (MODEL [plan flags] [--adapter DIR] | ENGINE_DIR) (--data FILE | --tasks T1,T2) [--json]

`--data` takes text, .jsonl/.json/.parquet rows, token ids (.npy, .bin) or a directory / glob of
them (see cqil.quality.data). Bad input (a missing model or data file, an adapter for another
plan, an unknown --targets name) is a one-line error and exit status 2 (see cqil.cli_util).
"""

from __future__ import annotations

import argparse
import json
import sys

from cqil.cli_util import ArgumentParser, add_hub_flags, add_logging_flags, add_plan_flags, configure_logging, run_main
from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.quality.finetune import finetune_main, finetune_parser  # noqa: F401  (cqil-finetune's entry, below)
from cqil.quality.options import PRECISION_CHOICES, add_data_flags, add_device_flag, read_tokens, seq_len_of
from cqil.runtime.backends import add_backend_flags, backend_options

# -- cqil-analyze -----------------------------------------------------------------------------------

def analyze_parser() -> argparse.ArgumentParser:
    from cqil.quality.similarity import DEFAULT_THRESHOLD

    parser = ArgumentParser(
        prog="cqil-analyze",
        description="Cosine similarity of the inputs of nearby layers on held-out text, and the CQIL "
                    "range it suggests for p.")
    parser.add_argument("model", help="HuggingFace checkpoint: a local folder or a hub id (with its tokenizer, for "
                                      "text data)")
    add_hub_flags(parser)
    parser.add_argument("--p", type=int, default=2, help="layers per group to suggest a range for (default 2)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"least similarity of a layer's input to its group's input (default {DEFAULT_THRESHOLD})")
    add_data_flags(parser, "tokens per forward window (default 256)", max_tokens_default=8192)
    add_device_flag(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", help="write a PNG plot of the similarities here")
    add_logging_flags(parser)
    return parser


def analyze_main(argv=None) -> int:
    from cqil.model.hub import resolve_model
    from cqil.model.loader import load_model
    from cqil.quality.data import as_long
    from cqil.quality.similarity import measure, suggest_range
    from cqil.quality.targets import torch_device

    args = analyze_parser().parse_args(argv)
    configure_logging(args, "cqil-analyze")
    args.model = str(resolve_model(args.model, args.revision, args.cache_dir))
    cfg = ModelConfig.from_dir(args.model)
    if args.p < 2:
        raise CqilError(f"--p must be >= 2 to suggest a CQIL range (p=1 is the original model), got {args.p}")
    if not -1.0 <= args.threshold <= 1.0:
        raise CqilError(f"--threshold is a cosine similarity, in [-1, 1]; got {args.threshold}")
    device = torch_device(args.device)
    seq_len = seq_len_of(args.seq_len, 256, cfg.max_position_embeddings)
    ids = as_long(read_tokens(args.data, args, args.model, cfg.vocab_size))
    model = load_model(args.model, max_seq_len=seq_len, cfg=cfg).to(device)
    sim = measure(model, ids, seq_len, max_offset=args.p - 1)
    suggestion = suggest_range(sim, args.p, args.threshold)
    if args.plot:
        from cqil.quality.plot import plot_similarity

        plot_similarity(sim, suggestion, args.threshold, args.plot, title=f"{args.model}: layer-input similarity")
    if args.json:
        out = {**sim.to_dict(), "p": args.p, "threshold": args.threshold,
               "to_group_start": sim.to_group_start(suggestion.plan), "suggested": suggestion.to_dict(),
               "plot": args.plot}
        print(json.dumps(out))
    else:
        print(format_analysis(args.model, sim, suggestion, args.plot))
    return 0


def format_analysis(model: str, sim, suggestion, plot: str | None) -> str:
    plan = suggestion.plan
    group = sim.to_group_start(plan)
    lines = [f"model: {model} ({sim.num_layers} layers), {sim.tokens} tokens; cosine similarity of layer inputs",
             f"{'layer':>5}  {'cos(x_l, x_l+1)':>15}  {'cos(x_l, group input)':>21}"]
    for layer in range(sim.num_layers):
        adjacent = f"{sim.adjacent[layer]:.4f}" if layer < sim.num_layers - 1 else "-"
        to_group = f"{group[layer]:.4f}" if group[layer] is not None else "-"
        lines.append(f"{layer:>5}  {adjacent:>15}  {to_group:>21}")
    if plan.groups:
        lines.append(f"suggested for p={plan.p}: --start {plan.start} --end {plan.end} ({len(plan.groups)} groups, "
                     f"depth {plan.num_layers} -> {plan.depth}); similarity to group input: "
                     f"min {suggestion.min_similarity:.4f}, mean {suggestion.mean_similarity:.4f}")
    else:
        lines.append(f"suggested for p={plan.p}: no range")
    lines.append(f"rule: {suggestion.rule}")
    if plot:
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


# -- cqil-eval --------------------------------------------------------------------------------------

def eval_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cqil-eval",
        description="Perplexity on held-out data (strided sliding window), or lm-evaluation-harness tasks, of a "
                    "checkpoint under a plan, with an optional LoRA adapter, or of a compiled engine directory.")
    parser.add_argument("target", help="HuggingFace checkpoint (a local folder or a hub id), or an engine directory "
                                       "(has manifest.json)")
    add_hub_flags(parser)
    add_plan_flags(parser)
    parser.add_argument("--adapter", help="LoRA adapter folder from cqil-finetune, merged before evaluating")
    parser.add_argument("--allow-plan-mismatch", action="store_true",
                        help="merge an adapter even if it was trained for another plan")
    add_data_flags(parser, "tokens per window (default min(512, max_position_embeddings))", required=False)
    parser.add_argument("--stride", type=int, default=None, help="tokens between window starts (default seq-len/2)")
    parser.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks instead of --data "
                                        "(e.g. arc_easy,sciq; needs their datasets)")
    parser.add_argument("--include-path", help="folder of extra lm-evaluation-harness task YAML files")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples per task (default: the task's)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (for a quick look)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward for --tasks (default 1)")
    add_device_flag(parser)
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                        help="dtype of a checkpoint's weights (default fp32)")
    add_backend_flags(parser)  # for an engine directory (--device is for a checkpoint)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_logging_flags(parser)
    return parser


def eval_main(argv=None) -> int:
    from cqil.exporters.manifest import is_engine_dir
    from cqil.quality.data import as_long
    from cqil.quality.perplexity import perplexity
    from cqil.quality.targets import engine_target, model_target, plan_for_eval

    args = eval_parser().parse_args(argv)
    configure_logging(args, "cqil-eval")
    if (args.data is None) == (args.tasks is None):
        raise CqilError("give either --data (perplexity) or --tasks (lm-evaluation-harness)")
    engine = is_engine_dir(args.target)
    if not engine:
        from cqil.model.hub import resolve_model

        args.target = str(resolve_model(args.target, args.revision, args.cache_dir))
    if engine:
        flags = [f for f in ("p", "start", "end", "bypass", "adapter") if getattr(args, f) is not None]
        flags += [f for f, default in (("device", "cpu"), ("precision", "fp32")) if getattr(args, f) != default]
        if flags:
            raise CqilError(f"{args.target} is an engine directory: its plan, weights and devices are fixed at "
                            f"compile time, so --{', --'.join(flags)} cannot apply")
    else:
        if args.backend != "onnxruntime" or args.devices:
            raise CqilError(f"--backend / --devices run an engine directory; {args.target} is a checkpoint: "
                            f"use --device (and --precision)")
        cfg = ModelConfig.from_dir(args.target)
        plan, _ = plan_for_eval(cfg, args.p, args.start, args.end, args.bypass, args.bypass_semantics)
    if args.tasks:
        return _eval_tasks(args, None if engine else plan)
    if engine:
        from cqil.runtime.spec import EngineSpec

        cfg = EngineSpec.read(args.target, verify=False).config
    ids = as_long(read_tokens(args.data, args, args.target, cfg.vocab_size))  # bad data fails before weights load
    if engine:
        target = engine_target(args.target, **backend_options(args))
        seq_len = seq_len_of(args.seq_len, 512, target.max_seq_len)
    else:
        seq_len = seq_len_of(args.seq_len, 512, cfg.max_position_embeddings)
        target = model_target(args.target, plan, args.adapter, args.allow_plan_mismatch, max_seq_len=seq_len,
                              device=args.device, precision=args.precision)
    stride = args.stride or max(seq_len // 2, 1)
    result = perplexity(target.logits, ids, seq_len, stride, progress=sys.stderr.isatty() and not args.quiet)
    out = {**result, "seq_len": seq_len, "stride": stride, "kind": target.kind, **target.describe}
    if args.json:
        print(json.dumps(out))
    else:
        what = target.describe.get("plan_text", target.kind) + (f" + adapter {args.adapter}" if args.adapter else "")
        print(f"{args.target} [{what}]: perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.4f}) "
              f"over {result['tokens']} tokens, {result['windows']} windows of {seq_len}, stride {stride}")
    return 0


def _eval_tasks(args, plan) -> int:
    from cqil.quality.lm_eval import CqilLM, evaluate_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CqilError("--tasks names no task")
    lm = CqilLM(args.target, plan=plan, adapter=args.adapter, allow_plan_mismatch=args.allow_plan_mismatch,
                device=args.device, precision=args.precision, batch_size=args.batch_size, max_length=args.seq_len,
                backend=args.backend, devices=args.devices)
    results = evaluate_tasks(lm, tasks, args.include_path, args.num_fewshot, args.limit)
    if args.json:
        print(json.dumps({"tasks": results["results"], "target": args.target, **lm.target.describe}, default=str))
    else:
        from lm_eval.utils import make_table

        print(make_table(results))
    return 0


def analyze_entry():
    sys.exit(run_main("cqil-analyze", analyze_main))


def finetune_entry():
    from cqil.quality.finetune import entry

    entry()


def eval_entry():
    sys.exit(run_main("cqil-eval", eval_main))
