"""The GPU check: every GPU path cqil has, on one CUDA machine, in one command (<= 8 minutes on an H200).

    PYTHONPATH=. python tools/gpu_check.py --out gpu_check.json          # from the repo root, nothing installed
    PYTHONPATH=. python tools/gpu_check.py --devices cpu --quick         # the same sections as a dry run (CI)

Needs only what a stock CUDA PyTorch machine has: torch (with CUDA), numpy, transformers,
safetensors, onnx and onnxruntime (a CPU build is enough: it is the reference). Not needed:
polygraphy, TensorRT, onnxruntime-gpu (their paths are reported as unreachable when absent).

Sections (each prints a markdown table and rewrites --out as JSON, so a run cut short keeps what
it measured):

1. environment: GPU, versions, and the paths this machine cannot reach and why (ONNX Runtime's
   CUDA provider, TensorRT, NCCL across GPUs).
2. correctness: tiny random LLaMAs (fp32 p=1, fp32 p=2 d=1, fp32 p=4 d=1, fp16 p=2 d=1, bf16 p=2
   d=1), every rank on the same GPU with its own stream, through the torch backend in eager,
   static and CUDA-graph decode. Against the CPU reference (ONNX Runtime; the torch backend on the
   CPU for bf16, which ONNX Runtime's CPU provider cannot run): prefill and 6 teacher-forced decode
   steps within the dtype's tolerance (cqil.verify.TOLERANCES), and 120 greedy tokens (the KV
   buffers grow past 64 positions) identical in fp32, then a second batch of another size (new
   buffers, new graphs). A graph row fails if capture fell back or no graph was captured.
3. timing: decode ms/token of p=1, p=2, p=4 on one GPU (ranks as streams) for the ~125M model and
   a 1B-shaped model (hidden 2048, 16 layers, GQA 32/4), fp16, batch 1, eager and CUDA graphs; each
   step's wall time, the device time between CUDA events on rank 0's stream, and the host overhead
   (eager wall time - graph device time: the same work without Python in the way).

4. finetune: cqil-finetune against a plain transformers + peft loop (tools/bench_finetune.py: the
   125M model, bf16, sequences of 1024, 20 timed steps; s/step and peak memory side by side).
   Skipped with --quick (the dry run; the CPU path has its own tests).

Exit status 0 when every correctness check passed, 1 otherwise, 2 when the machine cannot run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/gpu_check.py` puts tools/ first: cqil lives one level up
    sys.path.insert(0, str(ROOT))

REQUIRED = ("torch", "numpy", "safetensors", "transformers", "onnx", "onnxruntime")
TINY = dict(num_hidden_layers=6, max_position_embeddings=512)
CORRECTNESS = {  # name -> (dtype, plan)
    "fp32-p1": ("float32", dict(p=1)),
    "fp32-p2-d1": ("float32", dict(p=2, start=1, end=5, bypass=1)),
    "fp32-p4-d1": ("float32", dict(p=4, start=1, end=5, bypass=1)),
    "fp16-p2-d1": ("float16", dict(p=2, start=1, end=5, bypass=1)),
    "bf16-p2-d1": ("bfloat16", dict(p=2, start=1, end=5, bypass=1)),
}
ONE_B = dict(arch="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--work", help="folder for checkpoints and engines (default: a temporary one); reused if given")
    p.add_argument("--quick", action="store_true", help="small timing models and few tokens (the CPU dry run)")
    p.add_argument("--skip-timing", action="store_true")
    return p.parse_args(argv)


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.data = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": [], "timing": [], "errors": [],
                     "unreachable": {}}

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def error(self, where: str, e: BaseException):
        line = f"{where}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"ERROR {line}", flush=True)
        traceback.print_exc()
        self.data["errors"].append(line)
        self.save()

    def table(self, rows: list[dict], columns: list[str]):
        print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)
        for r in rows:
            print("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |", flush=True)
        print(flush=True)
        self.save()


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.2f}"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return "" if v is None else str(v)


def compile_once(model_dir, out: Path, **options) -> Path:
    import cqil

    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        cqil.compile(model_dir, out, progress=False, log=lambda msg: None, formats=("onnx", "torch"), force=True,
                     **options)
        print(f"compiled {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# -- 1. environment ------------------------------------------------------------------------------

def environment(report: Report, args):
    import onnxruntime as ort
    import torch

    cuda = args.devices == "cuda"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "onnxruntime": ort.__version__,
           "devices": args.devices, "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "gpus": torch.cuda.device_count() if cuda else 0,
           "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None}
    report.data["environment"] = env
    unreachable = report.data["unreachable"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        unreachable["onnxruntime_cuda"] = f"onnxruntime {ort.__version__} has no CUDA provider (onnxruntime-gpu)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        unreachable["tensorrt"] = "the tensorrt package is not installed"
    if env["gpus"] < 2:
        unreachable["nccl"] = f"NCCL needs one GPU per rank; this machine has {env['gpus']}"
    print(f"gpu_check: {json.dumps(env)}", flush=True)
    report.table([{"path": k, "why not": v} for k, v in unreachable.items()], ["path", "why not"])


# -- 2. correctness ------------------------------------------------------------------------------

def teacher_forced(engine, ids, tokens):
    """Prefill logits (last position) and one step per column of `tokens`: float32 [B, 1 + n, V]."""
    import numpy as np

    gen = engine.generator(ids)
    out = [gen.logits]
    for i in range(tokens.shape[1]):
        gen.append_tokens(tokens[:, i:i + 1])
        out.append(gen.logits)
    return np.stack(out, 1).astype(np.float32)


def greedy(engine, ids, n: int):
    """(tokens, graphs captured, graph errors) of a greedy generation through a Generator."""
    gen = engine.generator(ids, max_new_tokens=n)
    while not gen.done:
        gen.next_tokens()
    graphs = sum(len(getattr(c, "graphs", ())) for c in gen.cache.values())
    errors = [r.graph_error for r in engine.runners.values() if getattr(r, "graph_error", None)]
    return gen.tokens, graphs, errors


def within(a, b, atol: float, rtol: float) -> bool:
    import numpy as np

    diff = np.abs(a - b)
    return bool(np.all((diff <= atol) | (diff <= rtol * np.abs(b))))


def correctness(report: Report, args, work: Path) -> bool:
    import numpy as np

    import cqil
    from cqil.testing import random_checkpoint
    from cqil.verify import TOLERANCES

    ckpt = work / "tiny-llama"
    if not (ckpt / "config.json").is_file():
        random_checkpoint(ckpt, "llama", init_std=0.2, **TINY)
    cuda = args.devices == "cuda"
    n_tokens = 40 if args.quick else 120
    ids = [[5, 7, 9, 11, 13], [3, 4]]
    ids_again = [[9, 8, 7], [1, 2, 3, 4, 5, 6], [42]]  # another batch size: new buffers, new graphs
    forced = np.array([[17, 40, 2, 99, 7, 250], [8, 8, 31, 0, 64, 1]])
    modes = ["eager", "static"] + (["graph"] if cuda else [])
    ok, rows = True, []
    for name, (dtype, plan) in CORRECTNESS.items():
        path = compile_once(ckpt, work / name, max_seq_len=256, dtype=dtype, **plan)
        atol, rtol = TOLERANCES[dtype]
        if dtype == "bfloat16":  # ONNX Runtime's CPU provider has no bf16 kernels: the torch backend on the CPU
            ref = cqil.load(path, backend="torch", devices="cpu", decode="eager")
        else:
            ref = cqil.load(path, threads=4)
        want_steps = teacher_forced(ref, ids, forced)
        want_tokens, want_again = greedy(ref, ids, n_tokens)[0], greedy(ref, ids_again, 24)[0]
        ranks = [args.devices] * plan["p"] if not cuda else ["cuda:0"] * plan["p"]  # all ranks on one GPU
        for decode in modes:
            where = f"{name} {args.devices} decode={decode}"
            try:
                eng = cqil.load(path, backend="torch", devices=ranks, decode=decode)
                diff = float(np.abs(teacher_forced(eng, ids, forced) - want_steps).max())
                close = within(teacher_forced(eng, ids, forced), want_steps, atol, rtol)
                tokens, graphs, graph_errors = greedy(eng, ids, n_tokens)
                again, graphs_again, errors_again = greedy(eng, ids_again, 24)
                exact = dtype == "float32"
                same = tokens == want_tokens and again == want_again
                graph_ok = decode != "graph" or (graphs > 0 and graphs_again > 0 and not graph_errors + errors_again)
                passed = close and (same or not exact) and graph_ok
                ok &= passed
                rows.append({"engine": name, "decode": decode, "streams": plan["p"], "max_diff": diff, "atol": atol,
                             "tokens_equal": same, "graphs": graphs + graphs_again,
                             "graph_errors": graph_errors + errors_again, "passed": passed})
                print(f"{'PASS' if passed else 'FAIL'} {where}: max|diff| {diff:.2e} (atol {atol:g}), greedy tokens "
                      f"{'equal' if same else 'DIFFER'}, graphs {graphs}+{graphs_again}", flush=True)
                eng.close()
            except Exception as e:
                ok = False
                report.error(where, e)
        ref.close()
        report.data["checks"] = rows
        report.save()
    report.table(rows, ["engine", "decode", "streams", "max_diff", "atol", "tokens_equal", "graphs", "passed"])
    return ok


# -- 3. timing -----------------------------------------------------------------------------------

def time_steps(engine, prompt, n: int, cuda: bool) -> tuple[float, float]:
    """Median wall ms and device ms (CUDA events on rank 0's stream) per decode step."""
    import torch

    gen = engine.generator(prompt, max_new_tokens=n)
    gen.next_tokens()  # the first step runs the prefill's pending token: not a decode step to time
    walls, spans = [], []
    stream = getattr(engine.runners[0], "stream", None)
    while not gen.done:
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
        t0 = time.perf_counter()
        gen.next_tokens()
        if cuda:
            end.record(stream)
            end.synchronize()
            spans.append(start.elapsed_time(end))
        walls.append(1000 * (time.perf_counter() - t0))
    return statistics.median(walls), statistics.median(spans) if spans else float("nan")


def timing(report: Report, args, work: Path):
    from cqil.testing import PRESETS, random_checkpoint

    cuda = args.devices == "cuda"
    n_new = 16 if args.quick else 128
    prompt_len = 16
    models = {"125M": ("bench125m", {}), "1B-shaped": ("llama", ONE_B)} if not args.quick else \
             {"tiny": ("llama", dict(num_hidden_layers=8))}
    rows = []
    for label, (preset, overrides) in models.items():
        ckpt = work / f"timing-{label}"
        if not (ckpt / "config.json").is_file():
            random_checkpoint(ckpt, preset, dtype="float16" if cuda else "float32",
                              **{k: v for k, v in overrides.items() if k != "arch"})
        L = overrides.get("num_hidden_layers", PRESETS[preset]["num_hidden_layers"])
        dtype = "float16" if cuda else "float32"
        plans = {"p1": dict(p=1)}
        for p in (2, 4) if label != "1B-shaped" else (2,):
            end = 1 + (L - 2) // p * p  # every layer but the first and the last in groups
            plans[f"p{p}"] = dict(p=p, start=1, end=end)
        vocab = overrides.get("vocab_size", PRESETS[preset]["vocab_size"])
        import numpy as np

        prompt = np.random.default_rng(0).integers(0, vocab, (1, prompt_len)).tolist()
        for name, plan in plans.items():
            path = compile_once(ckpt, work / f"timing-{label}-{name}", max_seq_len=prompt_len + n_new + 8,
                                dtype=dtype, **plan)
            ranks = ["cuda:0" if cuda else "cpu"] * plan["p"]
            row = {"model": label, "plan": name, "layers": L}
            for decode in ("eager", "graph") if cuda else ("eager", "static"):
                where = f"timing {label} {name} decode={decode}"
                try:
                    import cqil

                    eng = cqil.load(path, backend="torch", devices=ranks, decode=decode)
                    eng.generate(prompt, max_new_tokens=8)  # warm-up: allocations, cuBLAS, graph capture
                    wall, span = time_steps(eng, prompt, n_new, cuda)
                    row["depth"] = eng.plan.depth
                    row[f"{decode}_ms"], row[f"{decode}_device_ms"] = wall, span
                    eng.close()
                except Exception as e:
                    report.error(where, e)
            if cuda and "eager_ms" in row and "graph_device_ms" in row:
                row["host_overhead_ms"] = row["eager_ms"] - row["graph_device_ms"]
            rows.append(row)
            print(f"timing {label} {name}: {json.dumps(row)}", flush=True)
            report.data["timing"] = rows
            report.save()
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["plan"] == "p1"), None)
        best = "graph_ms" if cuda else "eager_ms"
        if base and best in row and best in base:
            row["vs_p1"] = row[best] / base[best]
    second = "graph" if cuda else "static"
    report.table(rows, ["model", "plan", "depth", "eager_ms", "eager_device_ms", f"{second}_ms",
                        f"{second}_device_ms", "host_overhead_ms", "vs_p1"])


def finetune(report: Report, args, work: Path):
    import subprocess

    if args.quick:
        report.data["skipped"] = {"finetune": "--quick"}
        return
    out = work / "bench_finetune.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_finetune.py"), "--device", args.devices, "--preset", "bench125m",
           "--precision", "bf16" if args.devices == "cuda" else "fp32", "--seq-len", "1024", "--steps", "20",
           "--warmup", "3", "--work", str(work / "finetune"), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    print(run.stdout[-2000:], flush=True)
    if run.returncode:
        raise RuntimeError(f"bench_finetune exited {run.returncode}: {run.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.read_text())
    rows = []
    for r in result["runs"]:
        rows.append({"side": r["side"], "s_per_step": statistics.median(r["step_s"]),
                     "peak_gib": r.get("peak_cuda_gb", r.get("peak_rss_gb"))})
    report.data["finetune"] = {"runs": rows, "settings": result["settings"]}
    report.table(rows, ["side", "s_per_step", "peak_gib"])


def main(argv=None) -> int:
    import importlib.util

    args = parse_args(argv)
    report = Report(Path(args.out))
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)}", file=sys.stderr)
        return 2
    import torch

    if args.devices == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --devices cpu for a dry run)", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cqil-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ok = False
    for section in (environment, correctness, *(() if args.skip_timing else (timing, finetune))):
        try:
            result = section(report, args, work) if section is not environment else section(report, args)
            ok = result if section is correctness else ok
        except Exception as e:
            report.error(section.__name__, e)
    report.data["ok"] = bool(ok) and not report.data["errors"]
    report.data["seconds"] = round(time.perf_counter() - t0, 1)
    report.save()
    print(f"gpu_check: {'OK' if report.data['ok'] else 'FAILED'} in {report.data['seconds']} s; wrote {args.out}",
          flush=True)
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
