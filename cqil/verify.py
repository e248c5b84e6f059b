"""`cqil-check`: run an engine and the PyTorch reference of its plan on the same inputs.

    cqil-check ENGINE --model MODEL_DIR [--atol 1e-4] [--steps 32] [--json]

    report = check_engine(cqil.load("engine_dir"), "model_dir", atol=1e-4, steps=32)
    report["passed"]       # logits and presents within tolerance, greedy tokens identical

The reference is the checkpoint loaded in the engine's dtype and turned into the CQIL GraphModule
of the manifest's plan (`build_graph`), so a difference means the export or the runtime changed
the computation, not the plan. Both are compared with polygraphy's `Comparator` over `RunResults`
built from the two runs: the prefill (logits and every layer's present key/value), then each decode
step, teacher-forced on the reference's greedy tokens so the inputs stay identical (the engine's
steps through a Generator). Separately, `Engine.generate` must produce the same greedy tokens as the
reference's own KV-cache loop. Exit 0 when the engine matches, 1 when it does not, 2 on bad input.

Not here: comparing against `transformers` (the reference's equality with it is tested elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cqil.cli_util import ArgumentParser, add_hub_flags, add_logging_flags, configure_logging, run_main
from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.model.loader import load_model
from cqil.passes import build_graph
from cqil.plan import Plan
from cqil.program import cache_entries, present_name
from cqil.runtime.backends import add_backend_flags, backend_options

# ModelConfig fields that do not change the computation (token ids, the checkpoint's storage dtype)
_NOT_COMPUTATION = {"torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id", "extra"}

# Default (atol, rtol) by engine dtype; an element passes within atol or within rtol. fp32: the
# engine and the reference differ only in summation order (~1e-6 seen). fp16 keeps 11 significant
# bits: one unit in the last place of a logit between 16 and 32 is 2^-6 = 0.0156, which is what a
# correct fp16 engine shows against the fp16 reference; 0.05 allows ~3 of them after a dozen layers
# of rounding, rtol 1% the same for large logits. bf16 keeps 8 bits: 8x coarser (ulp 0.125 at 16).
TOLERANCES = {"float32": (1e-4, 0.0), "float16": (5e-2, 1e-2), "bfloat16": (0.25, 4e-2)}

# Quantized weights move every output by more than rounding, so a quantized engine is held to
# (atol, rtol, least top-1 agreement): its logits near the float reference's, and the reference's
# greedy choice its own choice in most teacher-forced steps (greedy runs may then part ways). On
# the fixture model: int8 logits within 0.16 of fp32, top-1 agreement 99%; int4 within 1.9, 93%
# (docs/quality.md); the bounds leave room for other models, not for a broken engine.
QUANT_TOLERANCES = {"int8": (0.5, 0.05, 0.95), "int4": (4.0, 0.25, 0.80)}


def load_reference(engine, model_dir, adapter=None):
    """The checkpoint in the engine's dtype, as the GraphModule of the engine's plan -> (model, gm)."""
    manifest = engine.manifest
    cfg = ModelConfig.from_dir(model_dir)
    ours, theirs = cfg.to_dict(), manifest["model"]
    differ = sorted(k for k in ours if k not in _NOT_COMPUTATION and ours[k] != theirs.get(k))
    if differ:
        raise CqilError(f"check: {model_dir} is not the model this engine was compiled from: "
                        + ", ".join(f"{k} {ours[k]!r} vs engine {theirs.get(k)!r}" for k in differ[:4]))
    recorded = (manifest.get("source") or {}).get("adapter")
    if recorded and adapter is None:
        raise CqilError(f"check: the engine was compiled with the LoRA adapter {recorded} merged; pass "
                        f"--adapter {recorded} so that the reference merges it too")
    if adapter is not None and not recorded:
        raise CqilError("check: --adapter given, but the engine was compiled without an adapter")
    plan = Plan.from_dict(manifest["plan"])
    model = load_model(model_dir, dtype=manifest["dtype"], max_seq_len=engine.max_seq_len, cfg=cfg,
                       adapter=adapter, plan=plan)
    return model, build_graph(model, plan)


def reference_greedy(model, gm, ids: np.ndarray, steps: int):
    """Greedy decoding over the reference with its KV cache (no padding).

    Returns (prefill logits [B, T, V], presents {name: [B, kv, T, D]}, decode logits [[B, 1, V]] * (steps-1),
    tokens [B, steps]); all float32 numpy.
    """
    cfg = model.config
    x = torch.from_numpy(ids)
    B, T = x.shape
    with torch.no_grad():
        logits, past = gm(x, torch.ones(B, T, dtype=torch.long), torch.arange(T).expand(B, T), model.empty_cache(B))
        prefill = logits.float().numpy()
        presents = {present_name(layer, kind): past[j].float().numpy()
                    for j, (layer, kind) in enumerate(cache_entries(range(cfg.num_layers)))}
        tokens, decode = [], []
        for i in range(steps):
            token = logits[:, -1].argmax(-1)  # [B]
            tokens.append(token.numpy())
            if i == steps - 1:
                break
            logits, past = gm(token[:, None], torch.ones(B, T + i + 1, dtype=torch.long),
                              torch.full((B, 1), T + i), past)
            decode.append(logits.float().numpy())
    return prefill, presents, decode, np.stack(tokens, 1)


def engine_forced(engine, ids: np.ndarray, tokens: np.ndarray):
    """The engine's prefill and decode steps, fed `tokens` [B, steps] (as reference_greedy returns them)."""
    prefill = engine.logits(ids)
    gen = engine.generator(ids)
    presents = {}
    for cache in gen.cache.values():
        for name, value in cache.arrays().items():
            presents.setdefault(name, _numpy(value))
    decode = []
    for i in range(tokens.shape[1] - 1):
        gen.append_tokens(tokens[:, i:i + 1])
        decode.append(gen.logits[:, None].astype(np.float32))
    return prefill, presents, decode


def _numpy(value) -> np.ndarray:
    array = value.float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)
    return np.ascontiguousarray(array)  # a cache's valid prefix is a strided view


def compare(engine_iters: list[dict], reference_iters: list[dict], atol: float, rtol: float) -> dict:
    """polygraphy's Comparator over one RunResults of two runners -> {output: {max_abs, max_rel, passed}}."""
    import contextlib

    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    results = RunResults()
    results.add(engine_iters, runner_name="engine")
    results.add(reference_iters, runner_name="reference")
    with contextlib.redirect_stdout(sys.stderr):  # polygraphy logs to stdout; ours is the report (--json)
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    report: dict[str, dict] = {}
    for per_pair in accuracy[0].values():
        for iteration in per_pair:
            for name, res in iteration.items():
                entry = report.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "passed": True})
                entry["max_abs"] = max(entry["max_abs"], float(res.max_absdiff))
                entry["max_rel"] = max(entry["max_rel"], float(res.max_reldiff))
                entry["passed"] = entry["passed"] and bool(res)
    missing = set().union(*map(set, reference_iters)) - set(report)
    if missing:
        raise CqilError(f"check: polygraphy compared no {sorted(missing)[:3]}")
    return report


def first_disagreement(engine_tokens: np.ndarray, ref_tokens: np.ndarray, ref_logits: np.ndarray, atol: float,
                       rtol: float) -> tuple[int | None, bool]:
    """(first step where greedy tokens differ or None, whether every row's first difference is a near
    tie). `ref_logits` [B, steps, V] are the reference's logits that chose each token. Two tokens
    whose reference logits are within twice the tolerance of each other may swap in a correct engine."""
    differ = engine_tokens != ref_tokens
    if not differ.any():
        return None, True
    ties = True
    for b in np.flatnonzero(differ.any(1)):
        i = int(np.argmax(differ[b]))
        top2 = np.sort(ref_logits[b, i])[-2:]
        ties &= bool(top2[1] - top2[0] <= 2 * (atol + rtol * abs(top2[1])))
    return int(np.argmax(differ.any(0))), ties


def check_engine(engine, model_dir, atol: float | None = None, rtol: float | None = None, steps: int = 32,
                 batch: int = 2, prompt_len: int = 8, seed: int = 0, adapter=None) -> dict:
    """Compare `engine` with the reference of its plan on random ids [batch, prompt_len]; see the module doc.
    Tolerances default by the engine's dtype (`TOLERANCES`)."""
    quant = (engine.manifest.get("quantization") or {}).get("kind")
    default_atol, default_rtol, min_agreement = QUANT_TOLERANCES[quant] if quant else (*TOLERANCES[engine.manifest["dtype"]], None)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    for name, value, low in (("steps", steps, 1), ("batch", batch, 1), ("prompt-len", prompt_len, 1)):
        if value < low:
            raise CqilError(f"check: --{name} must be >= {low}, got {value}")
    if not atol >= 0 or not rtol >= 0:
        raise CqilError(f"check: tolerances must be >= 0, got atol={atol} rtol={rtol}")
    if prompt_len + steps > engine.max_seq_len:
        raise CqilError(f"check: --prompt-len {prompt_len} + --steps {steps} exceeds the engine's "
                        f"max_seq_len {engine.max_seq_len}")
    if not Path(model_dir).is_dir():
        raise CqilError(f"check: model folder {model_dir} does not exist")
    model, gm = load_reference(engine, model_dir, adapter)
    ids = np.random.default_rng(seed).integers(0, engine.config.vocab_size, (batch, prompt_len), dtype=np.int64)

    ref_prefill, ref_presents, ref_decode, ref_tokens = reference_greedy(model, gm, ids, steps)
    eng_prefill, eng_presents, eng_decode = engine_forced(engine, ids, ref_tokens)
    outputs = compare([{"logits": eng_prefill, **eng_presents}] + [{"logits": d} for d in eng_decode],
                      [{"logits": ref_prefill, **ref_presents}] + [{"logits": d} for d in ref_decode],
                      atol, rtol)

    generated = np.array(engine.generate(ids, max_new_tokens=steps))[:, prompt_len:]
    choosing = np.concatenate([ref_prefill[:, -1:], *ref_decode], axis=1)  # [B, steps, V]
    first, near_tie = first_disagreement(generated, ref_tokens, choosing, atol, rtol)
    engine_choosing = np.concatenate([eng_prefill[:, -1:], *eng_decode], axis=1)
    agreement = float((engine_choosing.argmax(-1) == choosing.argmax(-1)).mean())
    tokens_ok = near_tie if min_agreement is None else agreement >= min_agreement
    return {
        "passed": all(o["passed"] for o in outputs.values()) and tokens_ok,
        "atol": atol,
        "rtol": rtol,
        "dtype": engine.manifest["dtype"],
        "plan": engine.manifest["plan"],
        "batch": batch,
        "prompt_len": prompt_len,
        "steps": steps,
        "outputs": outputs,
        "tokens_agree": first is None,
        "first_token_mismatch": first,
        "mismatch_at_near_tie": first is not None and near_tie,
        "quantization": quant,
        "top1_agreement": agreement,
        "min_top1_agreement": min_agreement,
        "engine_tokens": generated.tolist(),
        "reference_tokens": ref_tokens.tolist(),
    }


# -- the command line ---------------------------------------------------------------------------


def check_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cqil-check",
        description="Compare an engine with the PyTorch reference of its plan (same checkpoint, same inputs). "
                    "Exit 0: within tolerance and the same greedy tokens; 1: not; 2: bad input.")
    parser.add_argument("engine", help="engine directory (cqil-compile -o)")
    parser.add_argument("--model", required=True, help="the checkpoint the engine was compiled from (a folder or a "
                                                       "hub id)")
    parser.add_argument("--adapter", help="the LoRA adapter folder merged at compile time, if any")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default by the engine's dtype: float32 1e-4, "
                                                   "float16 0.05, bfloat16 0.25; quantized int8 0.5, int4 4)")
    parser.add_argument("--rtol", type=float, help="relative tolerance; an element passes within atol or within rtol "
                                                   "(default: float32 0, float16 0.01, bfloat16 0.04; int8 0.05, "
                                                   "int4 0.25)")
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps to compare (default 32)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the random inputs (default 2)")
    parser.add_argument("--prompt-len", type=int, default=8, help="random prompt length (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=int, help="engine intra-op threads in all (default: all cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the engine files")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_backend_flags(parser)
    add_hub_flags(parser)
    add_logging_flags(parser)
    return parser


def format_report(report: dict) -> str:
    lines = [f"{'output':<24} {'max abs':>10} {'max rel':>10}  (atol {report['atol']:g}, rtol {report['rtol']:g}, "
             f"{report['dtype']}, batch {report['batch']}, prompt {report['prompt_len']}, {report['steps']} steps)"]
    for name, o in report["outputs"].items():
        lines.append(f"{name:<24} {o['max_abs']:>10.3e} {o['max_rel']:>10.3e}  {'ok' if o['passed'] else 'FAIL'}")
    if report["quantization"]:
        lines.append(f"{report['quantization']} weights: the reference's greedy choice in "
                     f"{100 * report['top1_agreement']:.1f}% of the teacher-forced steps (at least "
                     f"{100 * report['min_top1_agreement']:.0f}% needed; tolerances for quantized weights)")
    if report["tokens_agree"]:
        lines.append(f"greedy tokens: identical for {report['steps']} steps")
    elif report["quantization"]:
        lines.append(f"greedy tokens: differ from step {report['first_token_mismatch']} (judged by the agreement above)")
    elif report["mismatch_at_near_tie"]:
        lines.append(f"greedy tokens: differ from step {report['first_token_mismatch']}, where the reference's two "
                     f"best tokens are within the tolerance of each other (allowed)")
    else:
        lines.append(f"greedy tokens: differ from step {report['first_token_mismatch']}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def check_cli(argv=None) -> int:
    from cqil.runtime.engine import load

    from cqil.model.hub import resolve_model

    args = check_parser().parse_args(argv)
    configure_logging(args, "cqil-check")
    args.model = str(resolve_model(args.model, args.revision, args.cache_dir))
    if args.threads is not None and args.threads < 1:
        raise CqilError(f"--threads must be >= 1, got {args.threads}")
    if not Path(args.model).is_dir():
        raise CqilError(f"--model {args.model} is not a directory")
    with load(args.engine, threads=args.threads, verify=not args.no_verify, **backend_options(args)) as engine:
        report = check_engine(engine, args.model, atol=args.atol, rtol=args.rtol, steps=args.steps,
                              batch=args.batch, prompt_len=args.prompt_len, seed=args.seed, adapter=args.adapter)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["passed"] else 1


def check_entry():
    sys.exit(run_main("cqil-check", check_cli))
