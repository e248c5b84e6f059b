"""From a checkpoint (or just its config) to the CQIL GraphModule.

    plan = resolve_plan(cfg, p=2)                   # flags, the authors' config keys, or defaults
    gm = build_graph(model, plan)                   # trace + passes
"""

from __future__ import annotations

import torch.fx as fx

from cqil.compiler.config import ModelConfig
from cqil.compiler.model import CausalLM
from cqil.compiler.trace import trace
from cqil.errors import CqilError
from cqil.passes.group_layers import group_layers
from cqil.plan import Plan

PASSES = [group_layers]


def resolve_plan(cfg: ModelConfig, p: int | None = None, start: int | None = None, end: int | None = None,
                 bypass: int | None = None, semantics: str | None = None,
                 replicate_outer: bool = False) -> tuple[Plan, str]:
    """The plan and where it came from ('flags', 'checkpoint config (cqil_layers)', 'default range').

    `semantics` defaults to "once", except for a plan read from the authors' `cqil_layers` keys:
    their released adapters were trained with "reference".
    """
    L = cfg.num_layers
    if start is None and end is None and "cqil_layers" in cfg.extra:
        plan = Plan.from_authors_config(L, cfg.extra["cqil_layers"], cfg.extra.get("d", 0) if bypass is None else bypass,
                                        semantics=semantics or "reference", replicate_outer=replicate_outer)
        if p is not None and p != plan.p:
            raise CqilError(f"plan: the checkpoint's cqil_layers use p={plan.p}, but --p {p} was given; "
                            f"pass --start/--end to override the checkpoint's plan")
        return plan, "checkpoint config (cqil_layers)"
    common = dict(semantics=semantics or "once", replicate_outer=replicate_outer)
    if p is None:
        raise CqilError("plan: give --p (the number of layers per group / ranks)")
    bypass = bypass or 0
    if start is None and end is None:
        return Plan.default(L, p, bypass=bypass, **common), "default range"
    default = Plan.default(L, p)
    end = default.end if end is None else end
    if start is None:
        start = end - (end - min(default.start, end)) // p * p
    return Plan(L, p, start, end, bypass=bypass, **common), "flags"


def run_passes(gm: fx.GraphModule, plan: Plan, passes=PASSES) -> fx.GraphModule:
    for pass_ in passes:
        try:
            gm = pass_(gm, plan)
        except CqilError:
            raise
        except Exception as e:
            raise CqilError(f"pass {pass_.__name__} failed: {type(e).__name__}: {e}") from e
    return gm


def build_graph(model: CausalLM, plan: Plan) -> fx.GraphModule:
    """Trace `model` (real or meta weights) and apply the CQIL passes."""
    return run_passes(trace(model), plan)
