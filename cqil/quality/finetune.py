"""`cqil-finetune`: train a LoRA adapter that recovers what a CQIL plan loses.

    cqil-finetune MODEL --p P [plan flags] --data FILE -o ADAPTER_DIR [--steps --lr --schedule --warmup
                  --batch --grad-accum --precision --device --grad-checkpoint --eval-data --eval-every ...]
    cqil-finetune ... --launcher torchrun --nproc-per-node N          # N data-parallel processes here
    torchrun --nnodes 2 --nproc-per-node 8 ... -m cqil.quality.finetune -- MODEL [the same flags]

Every process parses the same flags; torchrun's environment tells each one its rank (see
`cqil.quality.ddp`). The "--" keeps torchrun's own parser off the flags that follow (our --start is
a prefix of its --start-method). The training itself is `cqil.quality.train.finetune`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cqil.cli_util import (ArgumentParser, add_hub_flags, add_logging_flags, add_plan_flags, configure_logging,
                           plan_from_args, run_main)
from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.quality.options import PRECISION_CHOICES, add_data_flags, add_device_flag, read_tokens, seq_len_of

log = logging.getLogger("cqil.finetune")


def finetune_parser() -> argparse.ArgumentParser:
    from cqil.quality.lora import DEFAULT_TARGETS
    from cqil.quality.train import SCHEDULES, Settings

    d = Settings()
    parser = ArgumentParser(
        prog="cqil-finetune",
        description="Train a LoRA adapter that recovers the quality CQIL loses (self-distillation by default).")
    parser.add_argument("model", help="HuggingFace checkpoint: a local folder or a hub id (with its tokenizer, for "
                                      "text data)")
    add_hub_flags(parser)
    add_plan_flags(parser, p_required=True)
    add_data_flags(parser, f"tokens per training window (default {d.seq_len})")
    parser.add_argument("-o", "--output", required=True, help="adapter folder to write")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default {d.lr})")
    parser.add_argument("--schedule", choices=list(SCHEDULES), default=d.schedule,
                        help=f"learning rate after the warmup (default {d.schedule})")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear warmup (default 0)")
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                        help=f"clip the gradient norm to this, 0 = never (default {d.max_grad_norm:g})")
    parser.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    parser.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated Linear module names to adapt (default: all seven projections)")
    parser.add_argument("--batch", type=int, default=d.batch,
                        help=f"windows per micro-batch and process (default {d.batch})")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum,
                        help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True,
                        help="self-distillation from the original model (default); --no-kd: next-token loss")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=d.precision,
                        help="fp32, or autocast with the frozen weights in bf16/fp16 (default fp32)")
    parser.add_argument("--teacher-fp32", action="store_true",
                        help="with bf16/fp16: run the teacher in fp32 (the frozen weights stay fp32)")
    add_device_flag(parser)
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="recompute attention and MLP activations in the backward pass (less memory)")
    parser.add_argument("--eval-data", help="held-out data (any --data format), scored every --eval-every steps")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations, 0 = never")
    parser.add_argument("--save-every", type=int, default=d.save_every,
                        help=f"checkpoint every N steps into OUTPUT/checkpoint, 0 = never (default {d.save_every})")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the batch sampling and LoRA init")
    parser.add_argument("--launcher", choices=("none", "torchrun"), default="none",
                        help="torchrun: start --nproc-per-node data-parallel processes on this machine")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes for --launcher torchrun (default: the CUDA devices with --device cuda)")
    add_logging_flags(parser)
    return parser


def finetune_main(argv=None, env=os.environ) -> int:
    from cqil.model.hub import resolve_model
    from cqil.model.loader import build_meta_model, load_model
    from cqil.quality.ddp import Workers
    from cqil.quality.lora import lora_config
    from cqil.quality.targets import torch_device
    from cqil.quality.train import Settings, finetune

    args = finetune_parser().parse_args(argv)
    configure_logging(args, "cqil-finetune")
    args.model = str(resolve_model(args.model, args.revision, args.cache_dir))
    cfg = ModelConfig.from_dir(args.model)
    plan, source = plan_from_args(cfg, args)
    settings = Settings(steps=args.steps, lr=args.lr, rank=args.rank, alpha=args.alpha,
                        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                        seq_len=seq_len_of(args.seq_len, Settings().seq_len, cfg.max_position_embeddings),
                        batch=args.batch, grad_accum=args.grad_accum, kd=args.kd, precision=args.precision,
                        teacher_fp32=args.teacher_fp32, schedule=args.schedule, warmup=args.warmup,
                        max_grad_norm=args.max_grad_norm, save_every=max(args.save_every, 0),
                        eval_every=args.eval_every, seed=args.seed, device=args.device,
                        grad_checkpoint=args.grad_checkpoint)
    lora_config(build_meta_model(cfg), settings.rank, settings.alpha, settings.targets)  # check --targets early
    if args.eval_every and not args.eval_data:
        raise CqilError("--eval-every needs held-out data: --eval-data FILE")
    torch_device(args.device)  # no CUDA here: one line now, not one per process
    if args.launcher == "torchrun":
        return _torchrun_finetune(args, argv)
    workers = Workers.from_env(env)
    stream = read_tokens(args.data, args, args.model, cfg.vocab_size)
    eval_ids = read_tokens(args.eval_data, args, args.model, cfg.vocab_size) if args.eval_data else None
    model = load_model(args.model, dtype=settings.base_dtype, max_seq_len=settings.seq_len, cfg=cfg)
    if workers.is_main:
        per_step = settings.batch * settings.grad_accum * workers.world_size * settings.seq_len
        log.info(f"{plan} ({source}); {len(stream)} tokens, {per_step} per step ({workers.world_size} process(es)); "
                 f"{'self-distillation' if settings.kd else 'next-token'} loss, {settings.precision} on "
                 f"{settings.device}")
    result = finetune(model, plan, stream, settings, args.output, resume=args.resume, base_model_name=args.model,
                      eval_ids=eval_ids, workers=workers, progress=not args.quiet)
    losses = result["losses"]
    trend = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no steps left to run"
    if workers.is_main:
        print(f"wrote adapter {args.output} for {plan}: steps {result['start_step']}..{result['steps']}, {trend}")
    return 0


def _torchrun_finetune(args, argv) -> int:
    """The same flags, but for --launcher, to `torchrun -m cqil.quality.finetune` on this machine."""
    import subprocess

    import torch

    n = args.nproc_per_node
    if n is None:
        n = torch.cuda.device_count() if args.device.startswith("cuda") else 0
        if n < 1:
            raise CqilError("--launcher torchrun: say how many processes with --nproc-per-node")
    if n < 1:
        raise CqilError(f"--nproc-per-node must be >= 1, got {n}")
    rest = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--launcher=torchrun", "--launcher"):
        if flag in rest:
            i = rest.index(flag)
            del rest[i:i + (2 if flag == "--launcher" else 1)]
    # `python -m torch.distributed.run` is torchrun run by this interpreter; --standalone picks a free
    # local rendezvous port; "--" keeps torchrun's own parser off our flags
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                            "-m", "cqil.quality.finetune", "--", *rest])


def entry():
    rank = os.environ.get("RANK")
    sys.exit(run_main("cqil-finetune" + (f"[rank {rank}]" if rank else ""), finetune_main))


if __name__ == "__main__":  # torchrun --nproc-per-node N -m cqil.quality.finetune -- MODEL [flags]
    if sys.argv[1:2] == ["--"]:
        del sys.argv[1]
    entry()
