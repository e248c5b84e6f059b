"""Decode and first-token latency of cqil engines against onnxruntime-genai, side by side in one run.

    python tools/bench_decode.py [--model DIR] [--prompts 128 1024] [--new-tokens 64] [--threads 2]
                                 [--precisions fp32 int4] [--rounds 3] [--work DIR]

One ~125M-parameter LLaMA (hidden 768, 12 layers, GQA 12/4, vocab 32000; random weights made by
cqil.testing unless --model is given), batch 1, greedy, 2 threads for every runner:

- onnxruntime-genai: its model builder's CPU model of the same checkpoint
  (`python -m onnxruntime_genai.models.builder -i DIR -o OUT -p fp32|int4 -e cpu`; the builder
  wants a tokenizer, so a stub one with the right vocabulary is written into a copy of the folder:
  token ids go in directly), driven by `og.Generator` (append_tokens, generate_next_token).
  Skipped with a message when the package is absent.
- cqil p=1 and p=2 (the default range) with the default compile (fused operators, KV cache written
  in place), fp32 or `--quant int4` (block 32, as the peer's int4), driven by a Generator; and, at
  fp32, p=1 with `--no-fuse` (the plain graph), to show what fusion buys.

first token = prompt in, first new token chosen (prefill + one sample); decode = the median time of
the following steps (each: one forward of the last token and a choice). Rounds interleave the
runners so that a slow spell of the machine hits all alike, with a pause before each runner (the
previous one's spinning thread pool would otherwise slow its first token); each number is the best
round's.
Prints one markdown table with ratios against onnxruntime-genai at the same precision and prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def copy_bandwidth_gbs(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Memory traffic of a large copy on `threads` threads (numpy releases the GIL), read + write, GB/s."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    bounds = [(p[0], p[-1] + 1) for p in np.array_split(np.arange(src.size), threads)]
    with ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
        best = min(_timed(copy) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- onnxruntime-genai ----------------------------------------------------------------------------

# ONNX Runtime's intra-op threads spin for a while after a run; without a pause, whoever runs next
# (the first token above all) shares the cores with the previous runner's spinning pool
PAUSE_S = 0.5


def stub_tokenizer(folder: Path, vocab_size: int):
    """A tokenizer.json with exactly `vocab_size` tokens (no merges): the builder copies a tokenizer
    and the runtime loads it, but the benchmark feeds token ids, so its text behaviour is moot."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def build_genai(model_dir: Path, work: Path, precision: str, vocab_size: int) -> Path:
    out = work / f"genai-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    src = work / "genai-input"
    if not (src / "config.json").is_file():
        shutil.copytree(model_dir, src, dirs_exist_ok=True)
        stub_tokenizer(src, vocab_size)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"built onnxruntime-genai {precision} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


class Genai:
    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1, "log_severity_level": 3}}}}))
        self.model = og.Model(config)

    def run(self, prompt: list[int], new: int) -> tuple[float, list[float]]:
        params = self.og.GeneratorParams(self.model)
        total = len(prompt) + new
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens([prompt])
        gen.generate_next_token()
        first = time.perf_counter() - t0
        steps = []
        for _ in range(new - 1):
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
        return first, steps


# -- cqil -----------------------------------------------------------------------------------------

class Cqil:
    def __init__(self, engine_dir: Path, threads: int):
        import cqil

        self.engine = cqil.load(engine_dir, threads=threads, verify=False)

    def run(self, prompt: list[int], new: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        gen = self.engine.generator([prompt], max_new_tokens=new)
        gen.next_tokens()
        first = time.perf_counter() - t0
        steps = []
        while not gen.done:
            t = time.perf_counter()
            gen.next_tokens()
            steps.append(time.perf_counter() - t)
        return first, steps


def compile_engine(model: Path, out: Path, p: int, max_seq_len: int, **options) -> Path:
    import cqil

    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        cqil.compile(model, out, p=p, max_seq_len=max_seq_len, dtype="float32", progress=False, force=True,
                     log=lambda m: None, **options)
        print(f"compiled {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a random ~125M LLaMA)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", help="folder for the checkpoint and engines (default: a temporary one); reused")
    args = parser.parse_args(argv)

    from cqil.model.config import ModelConfig
    from cqil.testing import random_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="cqil-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / "bench125m"
    if not (model / "config.json").is_file():
        random_checkpoint(model, "bench125m")
    cfg = ModelConfig.from_dir(model)
    max_seq_len = max(args.prompts) + args.new_tokens + 8
    try:
        import onnxruntime_genai  # noqa: F401
        have_genai = True
    except ImportError:
        have_genai = False
        print("onnxruntime-genai is not installed (pip install onnxruntime-genai): its rows are skipped",
              file=sys.stderr)

    runners = {}  # (precision, name) -> runner
    for precision in args.precisions:
        quant = {"quant": "int4"} if precision == "int4" else {}
        if have_genai:
            runners[precision, "onnxruntime-genai"] = Genai(build_genai(model, work, precision, cfg.vocab_size),
                                                            args.threads)
        for p in (1, 2):
            folder = compile_engine(model, work / f"cqil-{precision}-p{p}-{max_seq_len}", p, max_seq_len, **quant)
            runners[precision, f"cqil p={p}"] = Cqil(folder, args.threads)
        if precision == "fp32":
            folder = compile_engine(model, work / f"cqil-fp32-p1-plain-{max_seq_len}", 1, max_seq_len, fuse=False)
            runners[precision, "cqil p=1 --no-fuse"] = Cqil(folder, args.threads)

    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(3, cfg.vocab_size, n).tolist() for n in args.prompts}
    best: dict[tuple, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for n, prompt in prompts.items():
            for (precision, name), runner in runners.items():
                time.sleep(PAUSE_S)  # the last runner's thread pools stop spinning first
                first, steps = runner.run(prompt, args.new_tokens)
                key = (precision, n, name)
                decode = statistics.median(steps)
                old = best.get(key, (float("inf"), float("inf")))
                best[key] = (min(old[0], first), min(old[1], decode))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}; "
          f"copy bandwidth {copy_bandwidth_gbs(args.threads):.1f} GB/s; model {model.name}; {args.new_tokens} new "
          f"tokens, batch 1, best of {args.rounds} interleaved rounds\n")
    print("| precision | prompt | runner | first token ms | decode ms/token | first vs genai | decode vs genai |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for precision in args.precisions:
        for n in args.prompts:
            peer = best.get((precision, n, "onnxruntime-genai"))
            for (prec, name), _ in runners.items():
                if prec != precision:
                    continue
                first, decode = best[precision, n, name]
                ratios = (f"{first / peer[0]:.2f} | {decode / peer[1]:.2f}" if peer else " | ")
                print(f"| {precision} | {n} | {name} | {1000 * first:.1f} | {1000 * decode:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
