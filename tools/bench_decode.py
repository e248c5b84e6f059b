"""Decode and prefill latency of cqil engines against their baselines, side by side in one run.

    python tools/bench_decode.py [--model DIR] [--prompt-len 128] [--new-tokens 64] [--threads 2]

Measured on one ~125M-parameter LLaMA (hidden 768, 12 layers, GQA 12/4, vocab 32000; random
weights made by cqil.testing unless --model is given), batch 1, fp32:

- transformers eager (`LlamaForCausalLM` with its KV cache), torch threads = --threads
- one-graph ORT: the whole model as one ONNX graph in one ONNX Runtime session, driven by a
  minimal loop (the p=1 engine's single segment file, run without cqil's runtime)
- cqil engine p=1 and p=2 (the default range), through `cqil.load(...).generate`

plus the memory-bandwidth bound: bytes read per token (weights + KV cache) / measured copy
bandwidth (read + write traffic of a large multi-threaded copy; a lower bound on time per token). Each
number is the median over decode steps of the best of --rounds runs (rounds interleave runners). Ratios are against the
one-graph session (lower is better). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def copy_bandwidth_gbs(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Memory traffic of a large copy on `threads` threads (numpy releases the GIL), read + write, GB/s."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts]
    with ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
        best = min(_timed(copy) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_transformers(model_dir, prompt, new_tokens, threads):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompt)[None]
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True)
        prefill = time.perf_counter() - t0
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)
    return prefill, statistics.median(steps)


def bench_one_graph(onnx_path, cfg, prompt, new_tokens, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    L, kvh, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    past = {f"past_key_values.{l}.{k}": np.zeros((1, kvh, 0, hd), np.float32) for l in range(L) for k in ("key", "value")}
    ids = np.array([prompt], np.int64)
    T = ids.shape[1]

    def step(tokens, start):
        n = tokens.shape[1]
        feeds = {"input_ids": tokens, "attention_mask": np.ones((1, start + n), np.int64),
                 "position_ids": np.arange(start, start + n, dtype=np.int64)[None], **past}
        outs = dict(zip(names, sess.run(names, feeds)))
        for key in past:
            past[key] = outs["present." + key.removeprefix("past_key_values.")]
        return outs["logits"][:, -1].argmax(-1)

    t0 = time.perf_counter()
    token = step(ids, 0)
    prefill = time.perf_counter() - t0
    steps = []
    for i in range(new_tokens - 1):
        t = time.perf_counter()
        token = step(token[:, None].astype(np.int64), T + i)
        steps.append(time.perf_counter() - t)
    return prefill, statistics.median(steps)


def bench_engine(engine_dir, prompt, new_tokens, threads):
    import cqil

    engine = cqil.load(engine_dir, threads=threads, verify=False)
    steps = []
    t_prefill = []

    def on_token(_):
        steps.append(time.perf_counter())

    t0 = time.perf_counter()
    engine.generate([prompt], max_new_tokens=new_tokens, streamer=on_token)
    t_prefill = steps[0] - t0
    engine.close()
    return t_prefill, statistics.median(np.diff(steps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a random ~125M LLaMA)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", help="folder for the checkpoint and engines (default: a temp folder)")
    args = parser.parse_args()

    import cqil
    from cqil.model.config import ModelConfig
    from cqil.testing import random_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="cqil-bench-"))
    model = args.model
    if model is None:
        model = work / "bench125m"
        if not (model / "config.json").exists():
            random_checkpoint(model, "bench125m")
    cfg = ModelConfig.from_dir(model)
    engines = {}
    for p in (1, 2):
        engines[p] = work / f"engine-p{p}"
        if not (engines[p] / "manifest.json").exists():
            cqil.compile(model, engines[p], p=p, max_seq_len=args.prompt_len + args.new_tokens + 8,
                         progress=False, force=True, log=lambda m: None)
    plan2 = cqil.load(engines[2], verify=False).plan
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
    one_graph = engines[1] / cqil.load(engines[1], verify=False).manifest["ranks"][0]["segments"][0]["files"][0]

    n = args.new_tokens
    runners = {
        "transformers eager": (bench_transformers, model),
        "one-graph ORT session": (bench_one_graph, one_graph, cfg),
        "cqil engine p=1": (bench_engine, engines[1]),
        f"cqil engine p=2 ({plan2.start}-{plan2.end}, depth {plan2.depth})": (bench_engine, engines[2]),
    }
    # rounds interleave the runners, so that a slow spell of the machine hits all of them alike
    runs = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, (fn, *where) in runners.items():
            runs[name].append(fn(*where, prompt, n, args.threads))
    rows = {name: (min(r[0] for r in rs), min(r[1] for r in rs)) for name, rs in runs.items()}
    weight_bytes = sum(r.get("weight_bytes", 0) for r in cqil.load(engines[1], verify=False).manifest["ranks"][0]["segments"])
    gbs = copy_bandwidth_gbs(args.threads)
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * (args.prompt_len + n // 2)
    bound_ms = 1000 * (weight_bytes + kv_bytes) / (gbs * 1e9)
    base = rows["one-graph ORT session"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}; "
          f"model {weight_bytes / 1e6:.0f} MB fp32 weights; prompt {args.prompt_len}, {n} new tokens, batch 1, "
          f"best of {args.rounds}")
    print(f"copy bandwidth {gbs:.1f} GB/s (read + write, {args.threads} threads) -> bandwidth bound "
          f"{bound_ms:.2f} ms/token (weights + half-length KV cache read once per token)\n")
    print("| runner | prefill ms | decode ms/token | prefill vs one-graph | decode vs one-graph |")
    print("|---|---:|---:|---:|---:|")
    for name, (prefill, decode) in rows.items():
        print(f"| {name} | {1000 * prefill:.1f} | {1000 * decode:.2f} | {prefill / base[0]:.2f} | {decode / base[1]:.2f} |")
    print(f"| bandwidth bound | | {bound_ms:.2f} | | {bound_ms / 1000 / base[1]:.2f} |")


if __name__ == "__main__":
    main()
