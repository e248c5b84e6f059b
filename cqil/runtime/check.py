"""cqil-check's core: run an engine and the PyTorch reference of its plan on the same inputs.

    report = check_engine(cqil.load("engine_dir"), "model_dir", atol=1e-4, steps=32)
    report["passed"]       # logits and presents within tolerance, greedy tokens identical

The reference is the checkpoint loaded in the engine's dtype and turned into the CQIL GraphModule
of the manifest's plan (`build_graph`), so a difference means the export or the runtime changed
the computation, not the plan. Both are compared with polygraphy's `Comparator` over `RunResults`
built from the two runs: the prefill (logits and every layer's present key/value), then each decode
step, teacher-forced on the reference's greedy tokens so the inputs stay identical. Separately,
`Engine.generate` must produce the same greedy tokens as the reference's own KV-cache loop.

Not here: comparing against `transformers` (the reference's equality with it is tested elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cqil.compiler.config import ModelConfig
from cqil.compiler.loader import load_model
from cqil.compiler.pipeline import build_graph
from cqil.errors import CqilError
from cqil.plan import Plan

# ModelConfig fields that do not change the computation (token ids, the checkpoint's storage dtype)
_NOT_COMPUTATION = {"torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id", "extra"}


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
    dtype = manifest["dtype"]
    if adapter is not None:  # as cqil.compile does: merge in float32, then cast
        from cqil.quality.adapter import merge_adapter

        model = load_model(model_dir, dtype="float32", max_seq_len=engine.max_seq_len, cfg=cfg)
        model = merge_adapter(model, adapter, plan)
        if dtype != "float32":
            model = model.to(getattr(torch, dtype))
            model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.float()
    else:
        model = load_model(model_dir, dtype=dtype, max_seq_len=engine.max_seq_len, cfg=cfg)
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
        presents = {f"present.{l}.{kind}": past[2 * l + j].float().numpy()
                    for l in range(cfg.num_layers) for j, kind in enumerate(("key", "value"))}
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
    B, T = ids.shape
    mask = np.ones((B, T), np.int64)
    positions = engine.positions(mask)
    cache = engine.new_cache(B)
    prefill = engine.forward(ids, mask, positions, cache).astype(np.float32)
    presents = {}
    for r in engine.ranks:
        for name, value in cache[r].items():
            presents.setdefault("present." + name.removeprefix("past_key_values."), value.astype(np.float32))
    decode = []
    for i in range(tokens.shape[1] - 1):
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        decode.append(engine.forward(tokens[:, i:i + 1], mask, positions, cache).astype(np.float32))
    return prefill, presents, decode


def compare(engine_iters: list[dict], reference_iters: list[dict], atol: float, rtol: float) -> dict:
    """polygraphy's Comparator over one RunResults of two runners -> {output: {max_abs, max_rel, passed}}."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    results = RunResults()
    results.add(engine_iters, runner_name="engine")
    results.add(reference_iters, runner_name="reference")
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


def check_engine(engine, model_dir, atol: float = 1e-4, rtol: float = 0.0, steps: int = 32, batch: int = 2,
                 prompt_len: int = 8, seed: int = 0, adapter=None) -> dict:
    """Compare `engine` with the reference of its plan on random ids [batch, prompt_len]; see the module doc."""
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
    agree = generated == ref_tokens
    first = None if agree.all() else int(np.argmax(~agree.all(0)))
    return {
        "passed": all(o["passed"] for o in outputs.values()) and first is None,
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
        "engine_tokens": generated.tolist(),
        "reference_tokens": ref_tokens.tolist(),
    }
