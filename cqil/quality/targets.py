"""What cqil-eval measures, as a logits function: a checkpoint under a plan (optionally with a merged
LoRA adapter), or a compiled engine directory.

Both give `ids [1, W] int64 -> logits [1, W, V]` plus the folder holding the tokenizer, so the
perplexity code cannot tell them apart. An engine directory is recognized by its `manifest.json`;
it is run through `cqil.runtime.load(engine_dir).logits(np.ndarray [B, T]) -> np.ndarray [B, T, V]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cqil.model.config import ModelConfig
from cqil.model.loader import load_model
from cqil.passes import build_graph
from cqil.plan import Plan, resolve_plan


@dataclass
class Target:
    kind: str  # "model" | "engine"
    logits: Callable[[torch.Tensor], object]
    tokenizer_dir: Path
    vocab_size: int | None
    max_seq_len: int | None
    plan: Plan | None = None
    describe: dict = field(default_factory=dict)


def original_plan(cfg: ModelConfig) -> Plan:
    """p=1: the model as trained, whatever its config says about CQIL."""
    return Plan(cfg.num_layers, 1, 0, 0)


def plan_for_eval(cfg: ModelConfig, p=None, start=None, end=None, bypass=None, semantics="once") -> tuple[Plan, str]:
    """No plan flags and no `cqil_layers` in the config: the original model; else as cqil-compile."""
    if p is None and start is None and end is None and bypass is None and "cqil_layers" not in cfg.extra:
        return original_plan(cfg), "original model"
    return resolve_plan(cfg.num_layers, p=p, start=start, end=end, bypass=bypass, semantics=semantics,
                        authors=cfg.extra)


def model_target(model_dir: str | Path, plan: Plan | None = None, adapter: str | Path | None = None,
                 allow_plan_mismatch: bool = False, max_seq_len: int | None = None) -> Target:
    """The checkpoint run as the CQIL GraphModule of `plan` (None: the original model)."""
    cfg = ModelConfig.from_dir(model_dir)
    plan = plan or original_plan(cfg)
    model = load_model(model_dir, max_seq_len=max_seq_len, cfg=cfg, adapter=adapter, plan=plan,
                       allow_plan_mismatch=allow_plan_mismatch)
    gm = build_graph(model, plan)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        with torch.no_grad():
            return gm(ids, torch.ones_like(ids), torch.arange(T).expand(B, T), model.empty_cache(B))[0]

    return Target("model", logits, Path(model_dir), cfg.vocab_size, cfg.max_position_embeddings, plan,
                  {"model": str(model_dir), "plan": plan.to_dict(), "plan_text": str(plan),
                   "adapter": str(adapter) if adapter else None})


def engine_target(engine_dir: str | Path) -> Target:
    """A compiled engine through the runtime's `load(engine_dir).logits`."""
    import numpy as np

    from cqil.runtime import load

    engine = load(str(engine_dir))

    def logits(ids: torch.Tensor):
        return engine.logits(np.ascontiguousarray(ids.numpy(), dtype=np.int64))

    return Target("engine", logits, Path(engine_dir), engine.config.vocab_size, engine.max_seq_len, engine.plan,
                  {"engine": str(engine_dir), "plan": engine.plan.to_dict(), "plan_text": f"engine, {engine.plan}"})
