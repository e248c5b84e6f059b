"""What cqil-eval measures: a checkpoint under a plan (optionally with a merged LoRA adapter), or a
compiled engine directory.

Both give `logits(ids [B, W] int64) -> logits [B, W, V]`, a greedy token stream for generation,
and the folder holding the tokenizer, so perplexity and lm-evaluation-harness cannot tell them
apart. An engine directory is recognized by its `manifest.json`; it is run through
`cqil.runtime.load(engine_dir)` (`.logits`, and a `Generator` for new tokens). A checkpoint runs as
the CQIL GraphModule on `device`, its KV cache as the graph's explicit past/present tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.model.loader import load_model
from cqil.passes import build_graph
from cqil.plan import Plan, resolve_plan

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Target:
    kind: str  # "model" | "engine"
    logits: Callable[[torch.Tensor], object]
    tokenizer_dir: Path
    vocab_size: int | None
    max_seq_len: int | None
    plan: Plan | None = None
    describe: dict = field(default_factory=dict)
    # greedy(prompt ids, max_new_tokens) -> the chosen ids, one at a time; the caller decides when to stop
    greedy: Callable[[list[int], int], Iterator[int]] | None = None


def original_plan(cfg: ModelConfig) -> Plan:
    """p=1: the model as trained, whatever its config says about CQIL."""
    return Plan(cfg.num_layers, 1, 0, 0)


def plan_for_eval(cfg: ModelConfig, p=None, start=None, end=None, bypass=None, semantics="once") -> tuple[Plan, str]:
    """No plan flags and no `cqil_layers` in the config: the original model; else as cqil-compile."""
    if p is None and start is None and end is None and bypass is None and "cqil_layers" not in cfg.extra:
        return original_plan(cfg), "original model"
    return resolve_plan(cfg.num_layers, p=p, start=start, end=end, bypass=bypass, semantics=semantics,
                        authors=cfg.extra)


def torch_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked: a missing GPU is a one-line error, not a CUDA traceback."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CqilError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CqilError(f"--device {name}: this machine has no CUDA device (or torch was built without CUDA)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CqilError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise CqilError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    return device


def model_target(model_dir: str | Path, plan: Plan | None = None, adapter: str | Path | None = None,
                 allow_plan_mismatch: bool = False, max_seq_len: int | None = None, device: str = "cpu",
                 precision: str = "fp32") -> Target:
    """The checkpoint run as the CQIL GraphModule of `plan` (None: the original model)."""
    cfg = ModelConfig.from_dir(model_dir)
    plan = plan or original_plan(cfg)
    dev = torch_device(device)
    model = load_model(model_dir, dtype=PRECISIONS[precision], max_seq_len=max_seq_len, cfg=cfg, adapter=adapter,
                       plan=plan, allow_plan_mismatch=allow_plan_mismatch).to(dev)
    gm = build_graph(model, plan)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        ids = ids.to(dev)
        with torch.no_grad():
            return gm(ids, torch.ones_like(ids), torch.arange(T, device=dev).expand(B, T), model.empty_cache(B))[0]

    def greedy(prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        ids, past, done = torch.tensor([prompt], device=dev), model.empty_cache(1), 0
        with torch.no_grad():
            for _ in range(max_new_tokens):
                T = ids.shape[1]
                mask = torch.ones(1, done + T, dtype=torch.long, device=dev)
                out, past = gm(ids, mask, torch.arange(done, done + T, device=dev)[None], past)
                done += T
                token = int(out[0, -1].argmax())
                yield token
                ids = torch.tensor([[token]], device=dev)

    return Target("model", logits, Path(model_dir), cfg.vocab_size, max_seq_len or cfg.max_position_embeddings,
                  plan, {"model": str(model_dir), "plan": plan.to_dict(), "plan_text": str(plan),
                         "adapter": str(adapter) if adapter else None, "device": str(dev), "precision": precision},
                  greedy)


def engine_target(engine_dir: str | Path, **runtime) -> Target:
    """A compiled engine through the runtime's `load(engine_dir, **runtime)` (backend, devices)."""
    import numpy as np

    from cqil.runtime import load

    engine = load(str(engine_dir), **runtime)

    def logits(ids: torch.Tensor):
        return engine.logits(np.ascontiguousarray(ids.cpu().numpy(), dtype=np.int64))

    def greedy(prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        gen = engine.generator([prompt], max_new_tokens=max_new_tokens)
        while not gen.done:
            yield int(gen.next_tokens()[0])

    return Target("engine", logits, Path(engine_dir), engine.config.vocab_size, engine.max_seq_len, engine.plan,
                  {"engine": str(engine_dir), "plan": engine.plan.to_dict(), "plan_text": f"engine, {engine.plan}"},
                  greedy)
