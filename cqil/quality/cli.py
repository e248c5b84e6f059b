"""`cqil-analyze`, `cqil-finetune`, `cqil-eval`: measure, repair and check CQIL's quality.

    cqil-analyze MODEL --data FILE [--p P] [--threshold T] [--json] [--plot out.png]
    cqil-finetune MODEL --p P [plan flags] --data FILE -o ADAPTER_DIR [--steps --lr --rank ...]
    cqil-eval (MODEL [plan flags] [--adapter DIR] | ENGINE_DIR) --data FILE [--json]

Bad input (a missing model or data file, an adapter for another plan, an unknown --targets name)
is a one-line error and exit status 2 (see cqil.cli_util).
"""

from __future__ import annotations

import argparse
import json
import sys

from cqil.cli_util import ArgumentParser, add_plan_flags, plan_from_args, run_main
from cqil.errors import CqilError
from cqil.model.config import ModelConfig


def _add_data_flags(parser, seq_len_help: str, max_tokens_default=None):
    parser.add_argument("--data", required=True, help="UTF-8 text file (held-out text for analyze/eval)")
    parser.add_argument("--seq-len", type=int, default=None, help=seq_len_help)
    parser.add_argument("--max-tokens", type=int, default=max_tokens_default,
                        help="use at most this many tokens of --data" +
                             (f" (default {max_tokens_default})" if max_tokens_default else " (default: all)"))


def _seq_len(requested: int | None, default: int, limit: int | None) -> int:
    if requested is None:
        return min(default, limit) if limit else default
    if requested < 2:
        raise CqilError(f"--seq-len must be >= 2, got {requested}")
    if limit and requested > limit:
        raise CqilError(f"--seq-len {requested} is longer than the model's max_position_embeddings={limit}")
    return requested


# -- cqil-analyze -----------------------------------------------------------------------------------

def analyze_parser() -> argparse.ArgumentParser:
    from cqil.quality.similarity import DEFAULT_THRESHOLD

    parser = ArgumentParser(
        prog="cqil-analyze",
        description="Cosine similarity of the inputs of nearby layers on held-out text, and the CQIL "
                    "range it suggests for p.")
    parser.add_argument("model", help="local HuggingFace checkpoint folder (with its tokenizer)")
    parser.add_argument("--p", type=int, default=2, help="layers per group to suggest a range for (default 2)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"least similarity of a layer's input to its group's input (default {DEFAULT_THRESHOLD})")
    _add_data_flags(parser, "tokens per forward window (default 256)", max_tokens_default=8192)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", help="write a PNG plot of the similarities here")
    return parser


def analyze_main(argv=None) -> int:
    from cqil.model.loader import load_model
    from cqil.quality.data import check_vocab, load_token_stream
    from cqil.quality.similarity import measure, suggest_range

    args = analyze_parser().parse_args(argv)
    cfg = ModelConfig.from_dir(args.model)
    if args.p < 2:
        raise CqilError(f"--p must be >= 2 to suggest a CQIL range (p=1 is the original model), got {args.p}")
    if not -1.0 <= args.threshold <= 1.0:
        raise CqilError(f"--threshold is a cosine similarity, in [-1, 1]; got {args.threshold}")
    seq_len = _seq_len(args.seq_len, 256, cfg.max_position_embeddings)
    ids = load_token_stream(args.data, args.model, args.max_tokens)
    check_vocab(ids, cfg.vocab_size)
    model = load_model(args.model, max_seq_len=seq_len, cfg=cfg)
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


# -- cqil-finetune ----------------------------------------------------------------------------------

def finetune_parser() -> argparse.ArgumentParser:
    from cqil.quality.finetune import Settings
    from cqil.quality.lora import DEFAULT_TARGETS

    d = Settings()
    parser = ArgumentParser(
        prog="cqil-finetune",
        description="Train a LoRA adapter that recovers the quality CQIL loses (self-distillation by default).")
    parser.add_argument("model", help="local HuggingFace checkpoint folder (with its tokenizer)")
    add_plan_flags(parser, p_required=True)
    _add_data_flags(parser, f"tokens per training window (default {d.seq_len})")
    parser.add_argument("-o", "--output", required=True, help="adapter folder to write")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    parser.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    parser.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated Linear module names to adapt (default: all seven projections)")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"windows per step (default {d.batch})")
    parser.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True,
                        help="self-distillation from the original model (default); --no-kd: next-token loss")
    parser.add_argument("--save-every", type=int, default=d.save_every,
                        help=f"checkpoint every N steps into OUTPUT/checkpoint, 0 = never (default {d.save_every})")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the batch sampling and LoRA init")
    return parser


def finetune_main(argv=None) -> int:
    from cqil.model.loader import build_meta_model, load_model
    from cqil.quality.data import load_token_stream
    from cqil.quality.finetune import Settings, finetune
    from cqil.quality.lora import lora_config

    args = finetune_parser().parse_args(argv)
    cfg = ModelConfig.from_dir(args.model)
    plan, source = plan_from_args(cfg, args)
    settings = Settings(steps=args.steps, lr=args.lr, rank=args.rank, alpha=args.alpha,
                        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                        seq_len=_seq_len(args.seq_len, Settings().seq_len, cfg.max_position_embeddings),
                        batch=args.batch, kd=args.kd, save_every=max(args.save_every, 0), seed=args.seed)
    lora_config(build_meta_model(cfg), settings.rank, settings.alpha, settings.targets)  # check --targets early
    stream = load_token_stream(args.data, args.model, args.max_tokens)
    model = load_model(args.model, max_seq_len=settings.seq_len, cfg=cfg)
    print(f"cqil-finetune: {plan} ({source}); {len(stream)} tokens; "
          f"{'self-distillation' if settings.kd else 'next-token'} loss", file=sys.stderr)
    result = finetune(model, plan, stream, settings, args.output, resume=args.resume, base_model_name=args.model)
    losses = result["losses"]
    trend = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no steps left to run"
    print(f"wrote adapter {args.output} for {plan}: steps {result['start_step']}..{result['steps']}, {trend}")
    return 0


# -- cqil-eval --------------------------------------------------------------------------------------

def eval_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cqil-eval",
        description="Perplexity on held-out text (strided sliding window) of a checkpoint under a plan, "
                    "with an optional LoRA adapter, or of a compiled engine directory.")
    parser.add_argument("target", help="HuggingFace checkpoint folder, or engine directory (has manifest.json)")
    add_plan_flags(parser)
    parser.add_argument("--adapter", help="LoRA adapter folder from cqil-finetune, merged before evaluating")
    parser.add_argument("--allow-plan-mismatch", action="store_true",
                        help="merge an adapter even if it was trained for another plan")
    _add_data_flags(parser, "tokens per window (default min(512, max_position_embeddings))")
    parser.add_argument("--stride", type=int, default=None, help="tokens between window starts (default seq-len/2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def eval_main(argv=None) -> int:
    from cqil.exporters.manifest import is_engine_dir
    from cqil.model.tokenizer import load_tokenizer
    from cqil.quality.data import check_vocab, read_text, tokenize
    from cqil.quality.perplexity import perplexity
    from cqil.quality.targets import engine_target, model_target, plan_for_eval

    args = eval_parser().parse_args(argv)
    text = read_text(args.data)  # bad data fails before any weights load
    if is_engine_dir(args.target):
        flags = [f for f in ("p", "start", "end", "bypass", "adapter") if getattr(args, f) is not None]
        if flags:
            raise CqilError(f"{args.target} is an engine directory: its plan and weights are fixed at compile "
                            f"time, so --{', --'.join(flags)} cannot apply")
        target = engine_target(args.target)
        seq_len = _seq_len(args.seq_len, 512, target.max_seq_len)
    else:
        cfg = ModelConfig.from_dir(args.target)
        plan, _ = plan_for_eval(cfg, args.p, args.start, args.end, args.bypass, args.bypass_semantics)
        seq_len = _seq_len(args.seq_len, 512, cfg.max_position_embeddings)
        target = model_target(args.target, plan, args.adapter, args.allow_plan_mismatch, max_seq_len=seq_len)
    stride = args.stride or max(seq_len // 2, 1)
    ids = tokenize(load_tokenizer(target.tokenizer_dir), text, args.max_tokens)
    if target.vocab_size:
        check_vocab(ids, target.vocab_size)
    result = perplexity(target.logits, ids, seq_len, stride, progress=sys.stderr.isatty())
    out = {**result, "seq_len": seq_len, "stride": stride, "kind": target.kind, **target.describe}
    if args.json:
        print(json.dumps(out))
    else:
        what = target.describe.get("plan_text", target.kind) + (f" + adapter {args.adapter}" if args.adapter else "")
        print(f"{args.target} [{what}]: perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.4f}) "
              f"over {result['tokens']} tokens, {result['windows']} windows of {seq_len}, stride {stride}")
    return 0


def analyze_entry():
    sys.exit(run_main("cqil-analyze", analyze_main))


def finetune_entry():
    sys.exit(run_main("cqil-finetune", finetune_main))


def eval_entry():
    sys.exit(run_main("cqil-eval", eval_main))
