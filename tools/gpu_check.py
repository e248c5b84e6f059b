"""One short GPU check of the torch backend: correctness against ONNX Runtime, then decode speed.

    python tools/gpu_check.py --out gpu_check.json                 # on a CUDA machine
    python tools/gpu_check.py --device cpu --out /tmp/dry.json     # dry run of the same steps on CPU

1. Correctness: a tiny random LLaMA compiled with `--formats onnx,torch` (fp32 p=1, fp32 p=2 d=1,
   fp16 p=2 d=1). For each, the torch backend on `--device` in every decode form (eager, static and,
   on CUDA, graph) against the same engine under ONNX Runtime on CPU: max |diff| of the prefill
   logits and of six decode steps, and whether 40 greedy tokens agree. fp32 must agree within
   `--atol` with identical tokens; fp16 is reported (and must stay within `--atol-fp16`).
2. Timing: a larger random model (`--timing-preset`, default the ~125M bench model on CUDA) as p=1
   (sequential) and p=2 over layers [1, L-1) (both ranks on one GPU, one CUDA stream each; eager
   and CUDA-graph decode), decode ms/token from
   `engine.stats` (median of `--repeats` generations after a warm-up that also captures the graphs).

Writes one JSON object to `--out` after every section (so a run cut short still leaves its results),
prints one line per measurement, exits 1 if a correctness check failed. `--work DIR` keeps the
checkpoints and engines, so that a second run skips compiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

REQUIRED = ("torch", "numpy", "safetensors", "transformers", "onnx", "onnxruntime")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--work", help="folder for checkpoints and engines (default: a temporary one)")
    p.add_argument("--atol", type=float, default=1e-4, help="fp32 logits tolerance (default 1e-4)")
    p.add_argument("--atol-fp16", type=float, default=5e-2, help="fp16 logits tolerance (default 5e-2)")
    p.add_argument("--timing-preset", help="cqil.testing preset for timing (default: bench125m on CUDA, llama on CPU)")
    p.add_argument("--timing-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--timing-tokens", type=int, help="new tokens per timed generation (default 128 CUDA, 16 CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-timing", action="store_true")
    return p.parse_args(argv)


def missing_modules() -> list[str]:
    import importlib.util

    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.data = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": [], "timing": [], "errors": []}

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def error(self, where: str, e: BaseException):
        line = f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"ERROR {line}", flush=True)
        traceback.print_exc()
        self.data["errors"].append(line)
        self.save()


def compile_once(model_dir, out: Path, **options) -> Path:
    import cqil

    if (out / "manifest.json").is_file():
        return out
    t0 = time.perf_counter()
    cqil.compile(model_dir, out, progress=False, log=lambda msg: None, formats=("onnx", "torch"), force=True,
                 **options)
    print(f"compiled {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def step_logits(engine, ids, tokens):
    """Prefill logits (last position) then one decode step per column of `tokens`: [B, 1 + n, V]."""
    import numpy as np

    gen = engine.generator(ids)
    out = [gen.logits]
    for i in range(tokens.shape[1]):
        gen.append_tokens(tokens[:, i:i + 1])
        out.append(gen.logits)
    return np.stack(out, 1).astype(np.float32)


def greedy(engine, ids, n):
    """(tokens, CUDA graphs captured, graph errors) of a greedy generation through a Generator."""
    gen = engine.generator(ids, max_new_tokens=n)
    while not gen.done:
        gen.next_tokens()
    ranks = list(engine.runners.values())
    return (gen.tokens, sum(len(getattr(c, "graphs", ())) for c in gen.cache.values()),
            [r.graph_error for r in ranks if getattr(r, "graph_error", None)])


def correctness(report: Report, args, work: Path) -> bool:
    import numpy as np

    import cqil
    from cqil.testing import random_checkpoint

    ckpt = work / "tiny-llama"
    if not (ckpt / "config.json").is_file():
        random_checkpoint(ckpt, "llama", init_std=0.2)
    engines = {
        "fp32-p1": compile_once(ckpt, work / "fp32-p1", p=1, max_seq_len=128),
        "fp32-p2-d1": compile_once(ckpt, work / "fp32-p2-d1", p=2, start=1, end=5, bypass=1, max_seq_len=128),
        "fp16-p2-d1": compile_once(ckpt, work / "fp16-p2-d1", p=2, start=1, end=5, bypass=1, max_seq_len=128,
                                   dtype="float16"),
    }
    ids = [[5, 7, 9, 11, 13], [3, 4]]
    tokens = np.array([[17, 40, 2, 99, 7, 250], [8, 8, 31, 0, 64, 1]])
    modes = ["eager", "static"] + (["graph"] if args.device == "cuda" else [])
    ok = True
    for name, path in engines.items():
        ort = cqil.load(path, threads=4)
        want_prefill, want_steps = ort.logits(ids), step_logits(ort, ids, tokens)
        want_tokens = ort.generate(ids, max_new_tokens=40)
        for decode in modes:
            where = f"{name} {args.device} decode={decode}"
            try:
                eng = cqil.load(path, backend="torch", devices=args.device, decode=decode)
                got_prefill = eng.logits(ids)
                got_steps = step_logits(eng, ids, tokens)
                got_tokens, graphs, graph_errors = greedy(eng, ids, 40)
                same_tokens = got_tokens == want_tokens
                d_prefill = float(np.abs(got_prefill - want_prefill).max())
                d_steps = float(np.abs(got_steps - want_steps).max())
                fp32 = name.startswith("fp32")
                atol = args.atol if fp32 else args.atol_fp16
                passed = d_prefill <= atol and d_steps <= atol and (same_tokens or not fp32)
                ok &= passed
                report.data["checks"].append({"engine": name, "device": args.device, "decode": decode,
                                              "max_diff_prefill": d_prefill, "max_diff_decode": d_steps,
                                              "tokens_equal": same_tokens, "atol": atol, "passed": passed,
                                              "graphs": graphs, "graph_errors": graph_errors})
                print(f"{'PASS' if passed else 'FAIL'} {where}: max|diff| prefill {d_prefill:.2e}, decode "
                      f"{d_steps:.2e}, greedy tokens {'equal' if same_tokens else 'DIFFER'}", flush=True)
                eng.close()
            except Exception as e:
                ok = False
                report.error(where, e)
            report.save()
    return ok


def timing(report: Report, args, work: Path):
    import numpy as np

    import cqil
    from cqil.testing import PRESETS, random_checkpoint

    cuda = args.device == "cuda"
    preset = args.timing_preset or ("bench125m" if cuda else "llama")
    n_new = args.timing_tokens or (128 if cuda else 16)
    L = PRESETS[preset]["num_hidden_layers"]
    ckpt = work / f"timing-{preset}"
    if not (ckpt / "config.json").is_file():
        random_checkpoint(ckpt, preset)
    max_seq_len = 16 + n_new
    dtype = args.timing_dtype if cuda else "float32"
    end = 1 + (L - 2) // 2 * 2  # p=2 on every layer but the first and the last: depth L -> L/2 + 1
    engines = {
        "p1": compile_once(ckpt, work / f"timing-{preset}-{dtype}-p1", p=1, max_seq_len=max_seq_len, dtype=dtype),
        "p2": compile_once(ckpt, work / f"timing-{preset}-{dtype}-p2-S1-E{end}", p=2, start=1, end=end,
                           max_seq_len=max_seq_len, dtype=dtype),
    }
    prompt = np.random.default_rng(0).integers(0, PRESETS[preset]["vocab_size"], (1, 16)).tolist()
    modes = ["eager", "graph"] if cuda else ["eager", "static"]
    for name, path in engines.items():
        for decode in modes:
            where = f"timing {preset} {dtype} {name} decode={decode}"
            try:
                devices = [args.device] * (2 if name == "p2" else 1)  # "cuda": both ranks on cuda:0 (streams)
                if cuda:
                    devices = ["cuda:0"] * len(devices)
                eng = cqil.load(path, backend="torch", devices=devices, decode=decode)
                eng.generate(prompt, max_new_tokens=n_new)  # warm-up: allocations, cuBLAS, graph capture
                runs = []
                for _ in range(args.repeats):
                    eng.generate(prompt, max_new_tokens=n_new)
                    runs.append(eng.stats["ms_per_token"])
                ms = statistics.median(runs)
                _, graphs, graph_errors = greedy(eng, prompt, n_new)
                report.data["timing"].append({"preset": preset, "layers": L, "dtype": dtype, "engine": name,
                                              "depth": eng.plan.depth, "decode": decode, "devices": devices,
                                              "new_tokens": n_new, "ms_per_token": ms, "runs": runs,
                                              "prefill_ms": eng.stats["prefill_ms"],
                                              "graphs": graphs, "graph_errors": graph_errors})
                print(f"{where}: {ms:.2f} ms/token (depth {eng.plan.depth}/{L}; runs "
                      f"{', '.join(f'{r:.2f}' for r in runs)})", flush=True)
                eng.close()
            except Exception as e:
                report.error(where, e)
            report.save()
    by = {(t["engine"], t["decode"]): t["ms_per_token"] for t in report.data["timing"]}
    for decode in modes:
        if ("p1", decode) in by and ("p2", decode) in by:
            change = 100 * (by[("p2", decode)] / by[("p1", decode)] - 1)
            print(f"p=2 vs p=1, decode={decode}: {change:+.1f}% ms/token", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(Path(args.out))
    missing = missing_modules()
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)}", file=sys.stderr)
        report.data["errors"].append(f"missing packages: {missing}")
        report.save()
        return 2
    import tempfile

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report.data["environment"] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if args.device == "cuda" else None,
    }
    print(f"gpu_check: {report.data['environment']}", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cqil-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ok = False
    try:
        ok = correctness(report, args, work)
    except Exception as e:
        report.error("correctness", e)
    if not args.skip_timing:
        try:
            timing(report, args, work)
        except Exception as e:
            report.error("timing", e)
    report.data["ok"] = ok and not report.data["errors"]
    report.data["seconds"] = round(time.perf_counter() - t0, 1)
    report.save()
    print(f"gpu_check: {'OK' if report.data['ok'] else 'FAILED'} in {report.data['seconds']} s; wrote {args.out}",
          flush=True)
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
