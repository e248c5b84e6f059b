"""Recorded outputs of engines compiled from the fixture model, to check that a change keeps them.

    python tools/golden.py write     # record anew, after a change meant to alter outputs (say why in the commit)
    python tools/golden.py check     # compare with the record (tests/test_golden.py does this)

For a few plans (p=1, p=2 with bypass, p=4 with the reference semantics, p=2 with replicated outer
layers) it records: the sha256 of every exported ONNX file, the greedy tokens of a ragged batch,
the sha256 of the prefill logits and a sample of their last position. Bits depend on the toolchain and the CPU
(ONNX Runtime picks kernels by instruction set), so the record carries both, and `compare` asks
for identical files and bits only on the same toolchain and CPU; elsewhere tokens must still be
identical and logits within 1e-5.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "small-llama"
RECORD = ROOT / "tests" / "fixtures" / "golden.json"
PLANS = {
    "p1": dict(p=1),
    "p2_d1": dict(p=2, start=2, end=10, bypass=1),
    "p4_d1_reference": dict(p=4, start=2, end=10, bypass=1, semantics="reference"),
    "p2_replicated": dict(p=2, start=2, end=10, replicate_outer=True),
}
PROMPTS = [[1, 100, 200, 300, 400, 5, 6, 7], [1, 42, 43]]
NEW_TOKENS = 32
LOGITS_STRIDE = 16  # the record keeps every 16th logit of the last position: enough to measure a drift
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def environment() -> dict:
    import onnx
    import onnxruntime
    import torch

    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((l for l in cpuinfo.read_text().splitlines() if l.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "isa": sorted(f for f in ISA_FLAGS if f in flags)}


def record(work: Path) -> dict:
    import cqil

    plans = {}
    for name, options in PLANS.items():
        engine_dir = cqil.compile(FIXTURE, work / name, max_seq_len=128, dtype="float32", fuse=False, progress=False,
                                  log=lambda m: None, **options)
        files = json.loads((engine_dir / "manifest.json").read_text())["files"]
        with cqil.load(engine_dir, threads=1) as engine:
            logits = engine.logits(PROMPTS)  # [2, T, V] float32
            tokens = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        plans[name] = {"onnx_sha256": {f: r["sha256"] for f, r in files.items() if f.endswith(".onnx")},
                       "tokens": tokens,
                       "logits_sha256": hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest(),
                       "last_logits": logits[:, -1, ::LOGITS_STRIDE].tolist()}
    return {"environment": environment(), "plans": plans}


def compare(recorded: dict, now: dict) -> list[str]:
    """What differs, as lines; bit-level checks only where toolchain and CPU are the recorded ones."""
    env_then, env_now = recorded["environment"], now["environment"]
    same_export = all(env_then[k] == env_now[k] for k in ("torch", "onnx"))
    same_bits = same_export and all(env_then[k] == env_now[k] for k in ("onnxruntime", "isa"))
    problems = []
    for name, then in recorded["plans"].items():
        got = now["plans"][name]
        if got["tokens"] != then["tokens"]:
            problems.append(f"{name}: greedy tokens differ")
        if same_export and got["onnx_sha256"] != then["onnx_sha256"]:
            changed = sorted(f for f in then["onnx_sha256"] if got["onnx_sha256"].get(f) != then["onnx_sha256"][f])
            problems.append(f"{name}: exported files differ: {changed or sorted(got['onnx_sha256'])}")
        diff = float(np.abs(np.array(got["last_logits"]) - np.array(then["last_logits"])).max())
        if same_bits and got["logits_sha256"] != then["logits_sha256"]:
            problems.append(f"{name}: logits are not bit-identical (last position max |diff| {diff:.3e})")
        elif diff > 1e-5:
            problems.append(f"{name}: last-position logits differ by {diff:.3e} (> 1e-5)")
    return problems


def main(argv=None) -> int:
    what = (argv or sys.argv[1:] or ["check"])[0]
    with tempfile.TemporaryDirectory(prefix="cqil-golden-") as tmp:
        now = record(Path(tmp))
    if what == "write":
        RECORD.write_text(json.dumps(now) + "\n")
        print(f"wrote {RECORD}")
        return 0
    problems = compare(json.loads(RECORD.read_text()), now)
    print("\n".join(problems) or "identical")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
