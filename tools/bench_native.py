"""The C++ runtime against the Python runners, side by side in one run: decode ms/token and first-token ms.

    python tools/bench_native.py [--model DIR] [--work DIR] [--prompt-len 128] [--new-tokens 64]
                                 [--threads 2] [--rounds 5] [--no-autotune]

On the ~125M-parameter benchmark LLaMA (cqil.testing's "bench125m", random weights, fp32) unless
--model is given, at p=1 and p=2 (the default range), batch 1, greedy, eos ignored. One engine per
plan holds both formats (`--formats onnx,aoti`, the packages built with --aoti-autotune unless
--no-autotune), so every runner reads the same folder:

- Python ONNX Runtime engine: `cqil-run ENGINE --json`
- the AOTI packages driven from Python: `cqil-run ENGINE --backend aoti --json`
- the C++ runtime: `cqil-run-native ENGINE --json` (libcqil, built here by cqil-build-native)

Each run is a fresh process and reports what cqil-run reports: `prefill_ms` (the prompt's forward
and the first token: first-token latency, model load excluded) and `ms_per_token` (mean over the
decode steps). Rounds interleave the runners, so that a slow spell of this shared machine hits all
of them alike; the table keeps each runner's best round. Also printed: the AOTI export and the
native build times. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run_json(argv: list[str]) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_engine(model, out: Path, p: int, max_seq_len: int, autotune: bool) -> float:
    if (out / "manifest.json").exists():
        return json.loads((out / "manifest.json").read_text())["aoti"]["seconds"]
    argv = [str(BIN / "cqil-compile"), str(model), "--p", str(p), "--dtype", "float32", "--max-seq-len",
            str(max_seq_len), "--formats", "onnx,aoti", "-o", str(out), "--force", "--no-progress"]
    if autotune:
        argv.append("--aoti-autotune")
    subprocess.run(argv, check=True)
    return json.loads((out / "manifest.json").read_text())["aoti"]["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a random ~125M LLaMA)")
    parser.add_argument("--work", help="folder for the checkpoint, engines and libcqil (default: a temp folder)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-autotune", action="store_true", help="default Inductor options for the packages")
    args = parser.parse_args()

    import numpy as np

    import cqil
    from cqil.compiler.native import build_native
    from cqil.model.config import ModelConfig
    from cqil.testing import random_checkpoint

    import onnxruntime
    import torch

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cqil-bench-native-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / "bench125m"
    if not (model / "config.json").exists():
        random_checkpoint(model, "bench125m")
    cfg = ModelConfig.from_dir(model)
    max_seq_len = args.prompt_len + args.new_tokens + 8
    suffix = "" if args.no_autotune else "-autotune"
    engines, export_s = {}, {}
    for p in (1, 2):
        engines[p] = work / f"engine-p{p}{suffix}"
        export_s[p] = compile_engine(model, engines[p], p, max_seq_len, not args.no_autotune)
    native = work / "native"
    t0 = time.perf_counter()
    if (native / "cqil-run-native").exists():
        build_s = None
    else:
        build_native(native)
        build_s = time.perf_counter() - t0

    prompt = ",".join(map(str, np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()))
    common = ["--input-ids", prompt, "--max-new-tokens", str(args.new_tokens), "--threads", str(args.threads),
              "--json", "--no-verify", "--ignore-eos"]
    runners = {
        "Python, ONNX Runtime": lambda e: [str(BIN / "cqil-run"), str(e), *common],
        "Python, AOTI packages": lambda e: [str(BIN / "cqil-run"), str(e), *common, "--backend", "aoti"],
        "C++ (libcqil)": lambda e: [str(native / "cqil-run-native"), str(e), *common],
    }
    results = {(name, p): [] for name in runners for p in engines}
    tokens = {}
    for _ in range(args.rounds):
        for p, engine in engines.items():
            for name, argv in runners.items():
                out = run_json(argv(engine))
                results[name, p].append((out["prefill_ms"], out["ms_per_token"]))
                tokens.setdefault(p, out["output_ids"])
                if out["output_ids"] != tokens[p]:
                    raise SystemExit(f"{name} at p={p} generated other tokens than the first runner")

    plan2 = cqil.load(engines[2], verify=False).plan
    manifest = json.loads((engines[1] / "manifest.json").read_text())
    weights = sum(seg.get("weight_bytes", 0) for seg in manifest["ranks"][0]["segments"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; model {weights / 1e6:.0f} MB fp32; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1, greedy, best of {args.rounds} rounds; "
          f"packages {'default options' if args.no_autotune else 'freezing + max_autotune'}")
    print(f"AOTI export (cqil-compile's aoti step): p=1 {export_s[1]:.0f} s, p=2 {export_s[2]:.0f} s; "
          f"native build {'(reused)' if build_s is None else f'{build_s:.0f} s'}; every runner generated the same tokens\n")
    print("| runner | p | first token ms | decode ms/token | decode vs fastest Python p=1 |")
    print("|---|---:|---:|---:|---:|")
    best = {key: (min(r[0] for r in rs), min(r[1] for r in rs)) for key, rs in results.items()}
    fastest = min(best[name, 1][1] for name in runners if name.startswith("Python"))
    for p in engines:
        for name in runners:
            first, decode = best[name, p]
            label = "" if p == 1 else f" ({plan2.start}-{plan2.end}, depth {plan2.depth})"
            print(f"| {name} | {p}{label} | {first:.1f} | {decode:.2f} | {decode / fastest:.2f} |")


if __name__ == "__main__":
    main()
