"""Graph passes over the traced model, and the pipeline that runs them.

    gm = build_graph(model, plan)        # trace + every pass in PASSES, in order

A pass is a function `name(gm, plan) -> gm`; its docstring says what it requires and guarantees.
`run_passes` names the pass that failed. `partition` (per-rank segments) is not in the list: it
turns the GraphModule into something else, and callers choose its size cap.
"""

from __future__ import annotations

import torch.fx as fx

from cqil.errors import CqilError
from cqil.model.model import CausalLM
from cqil.model.trace import trace
from cqil.passes.group_layers import group_layers
from cqil.plan import Plan

PASSES = [group_layers]


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
