"""cqil-finetune against a plain transformers + peft loop: time per step and peak memory, side by side.

    python tools/bench_finetune.py                                        # CPU: the 14M, 16-layer model
    python tools/bench_finetune.py --device cuda --precision bf16 --preset bench125m --steps 20 --out b.json

Both sides train the same random-weight LLaMA (made once with cqil.testing) on the same windows
(`cqil.quality.train.windows_at`) with the same LoRA (r = alpha, all seven projections), the same KD
loss (`distillation_loss`: KL(teacher || student), teacher = the model with the adapter disabled, in
inference mode), AdamW and gradient clipping at 1.0:

- cqil: `cqil.quality.train.finetune` with a CQIL plan (p=2 over the middle layers); its step
  times come from the run's train_log.jsonl;
- peft: transformers' LlamaForCausalLM (its default SDPA attention) wrapped by peft, a plain loop.

Every measurement runs in a fresh process (peak RSS is the process's high-water mark; on CUDA,
torch.cuda.max_memory_allocated). Rounds alternate the order of the sides. The first `--warmup`
steps are not timed; a side's time is the median of its timed steps, over all rounds. Prints one
line per run and a summary; `--out` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    # the model: ~14M parameters, 16 layers (the fixture's shapes, deeper)
    "small16": dict(preset="llama", vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=16,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024),
    "bench125m": dict(preset="bench125m"),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="small16")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="runs per side, order alternating (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU; default 2)")
    p.add_argument("--work", help="folder for the checkpoint (default: a temporary one)")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--worker", choices=("cqil", "peft"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_checkpoint(folder: Path, preset: str) -> Path:
    from cqil.testing import random_checkpoint

    if not (folder / "config.json").is_file():
        kw = dict(PRESETS[preset])
        random_checkpoint(folder, kw.pop("preset"), init_std=0.02, **kw)
    return folder


def stream_and_plan(model_dir):
    import torch

    from cqil.model.config import ModelConfig
    from cqil.plan import Plan

    layers = ModelConfig.from_dir(model_dir).num_layers
    start = layers // 4 + (layers // 4) % 2
    plan = Plan(layers, 2, start, start + 2 * ((layers - 2 - start) // 2))
    return torch.randint(0, 4096, (200_000,), generator=torch.Generator().manual_seed(0)), plan


def peak_memory(device) -> dict:
    import torch

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if device.startswith("cuda"):
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def run_cqil(args) -> dict:
    from cqil.model.loader import load_model
    from cqil.quality.train import Settings, finetune

    stream, plan = stream_and_plan(args.model)
    settings = Settings(steps=args.warmup + args.steps, lr=1e-4, rank=args.rank, alpha=args.rank, seq_len=args.seq_len,
                        batch=args.batch, precision=args.precision, device=args.device, save_every=0)
    with tempfile.TemporaryDirectory() as out:
        model = load_model(args.model, dtype=settings.base_dtype, max_seq_len=args.seq_len)
        result = finetune(model, plan, stream, settings, Path(out) / "adapter", progress=False)
        times = [json.loads(line)["time"] for line in (Path(out) / "adapter" / "train_log.jsonl").open()]
    steps = [b - a for a, b in zip([0.0] + times, times)]
    return {"step_s": steps[args.warmup:], "loss": [result["losses"][0], result["losses"][-1]], "plan": str(plan)}


def run_peft(args) -> dict:
    import peft
    import torch
    import transformers

    from cqil.quality.train import distillation_loss, windows_at

    stream, _ = stream_and_plan(args.model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    device = torch.device(args.device)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(TARGETS), lora_dropout=0.0)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32")
    steps, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        ids = windows_at(stream, step, args.seq_len, args.batch, seed=0)[:, :-1].to(device)
        with autocast:
            logits = model(input_ids=ids).logits
        with torch.inference_mode(), model.disable_adapter(), autocast:
            teacher = model(input_ids=ids).logits
        loss = distillation_loss(logits, teacher)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also waits for the GPU
        steps.append(time.perf_counter() - t0)
    return {"step_s": steps[args.warmup:], "loss": [losses[0], losses[-1]]}


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    result = (run_cqil if args.worker == "cqil" else run_peft)(args)
    print(json.dumps({"side": args.worker, **result, **peak_memory(args.device)}), flush=True)


def launch(args, side: str, model_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model", str(model_dir), "--device", args.device,
           "--precision", args.precision, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def versions() -> dict:
    import peft
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(Path(args.work or tmp) / args.preset, args.preset)
        runs = []
        for r in range(args.rounds):
            for side in (("cqil", "peft") if r % 2 == 0 else ("peft", "cqil")):
                runs.append(launch(args, side, model_dir))
                run = runs[-1]
                mem = f", peak CUDA {run['peak_cuda_gb']:.2f} GiB" if "peak_cuda_gb" in run else ""
                print(f"round {r} {side:>4}: {statistics.median(run['step_s']):.3f} s/step, "
                      f"peak RSS {run['peak_rss_gb']:.2f} GiB{mem}, loss {run['loss'][0]:.4f} -> {run['loss'][1]:.4f}",
                      flush=True)
    summary = {}
    for side in ("cqil", "peft"):
        mine = [r for r in runs if r["side"] == side]
        summary[side] = {"s_per_step": statistics.median(s for r in mine for s in r["step_s"]),
                         "peak_rss_gib": max(r["peak_rss_gb"] for r in mine)}
        if "peak_cuda_gb" in mine[0]:
            summary[side]["peak_cuda_gib"] = max(r["peak_cuda_gb"] for r in mine)
        summary[side]["steps_per_s"] = 1 / summary[side]["s_per_step"]
    ratio = summary["cqil"]["s_per_step"] / summary["peft"]["s_per_step"]
    mem = "peak_cuda_gib" if "peak_cuda_gib" in summary["cqil"] else "peak_rss_gib"
    print(f"cqil / peft: time per step x{ratio:.3f}, {mem} {summary['cqil'][mem]:.2f} vs {summary['peft'][mem]:.2f} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    if args.out:
        report = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "model", "out")},
                  "versions": versions(), "runs": runs, "summary": summary, "time_ratio": ratio,
                  "seconds": time.perf_counter() - t0}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
