"""The CQIL pass: rewrite each group of p adjacent layers into p parallel branches.

Requires: a GraphModule from `cqil.model.trace.trace` (nodes tagged `cqil.layer`).
Guarantees: for every group k of `plan.groups`, the members' nodes read the group input x, carry
`meta["cqil.rank"] = i`, `["cqil.group"] = k`, `["cqil.layer"] = layer`; the attention-output
exchange (d > 0) and the sum of the deltas are `all_gather` / `all_reduce_sum` call_function nodes
with `meta["cqil.collective"]`; the output of the group is `x + all_reduce_sum(...)`. Unless the plan
replicates the outer layers, the first group's input is `broadcast(x)` (x comes from rank 0).
Values that cross ranks are named in `meta["cqil.value"]` (`group{k}.attn`, `group{k}.delta`,
`group{k}.output`). Layers outside the range are untouched. `gm.meta["cqil.plan"]` holds the plan.

Before (two layers of a group, p=2)::

    h3 = x + attn3(norm3(x))[0];   y3 = h3 + mlp3(post3(h3))
    h4 = y3 + attn4(norm4(y3))[0]; y4 = h4 + mlp4(post4(h4))

After (d=1, semantics "once")::

    a3 = attn3(norm3(x))[0]                    # rank 0
    a4 = attn4(norm4(x))[0]                    # rank 1
    g = all_gather(a3, a4)                     # bypass exchange
    h3 = x + a3;          f3 = mlp3(post3(h3)); d3 = a3 + f3
    h4 = x + a4 + g[0];   f4 = mlp4(post4(h4)); d4 = a4 + f4      # "reference": d4 = a4 + g[0] + f4
    y4 = x + all_reduce_sum(d3, d4)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from cqil.errors import CqilError
from cqil.passes.collectives import all_gather, all_reduce_sum, broadcast
from cqil.plan import Plan


@dataclass
class LayerNodes:
    """The nodes of one traced decoder layer."""

    layer: int
    input: fx.Node  # the layer input x  [B, T, H]
    input_norm: fx.Node
    attn: fx.Node  # returns (output, present key, present value)
    attn_out: fx.Node
    key: fx.Node
    value: fx.Node
    post_norm: fx.Node
    mlp: fx.Node
    output: fx.Node  # h + mlp(...)
    all: list[fx.Node]  # every node tagged with this layer, in graph order


def find_layer(gm: fx.GraphModule, layer: int) -> LayerNodes:
    nodes = [n for n in gm.graph.nodes if n.meta.get("cqil.layer") == layer]
    prefix = f"model.layers.{layer}."
    by_target = {n.target[len(prefix):]: n for n in nodes
                 if n.op == "call_module" and n.target.startswith(prefix)}
    try:
        input_norm, attn = by_target["input_layernorm"], by_target["self_attn"]
        post_norm, mlp = by_target["post_attention_layernorm"], by_target["mlp"]
    except KeyError as e:
        raise CqilError(f"group_layers: layer {layer} has no {e.args[0]} node; trace the model with "
                        f"cqil.model.trace first")
    items = {n.args[1]: n for n in attn.users if n.target is operator.getitem}
    output = next((n for n in mlp.users if n.target is operator.add), None)
    if set(items) != {0, 1, 2} or output is None:
        raise CqilError(f"group_layers: layer {layer} does not have the traced decoder-layer shape")
    return LayerNodes(layer, input_norm.args[0], input_norm, attn, items[0], items[1], items[2],
                      post_norm, mlp, output, nodes)


def group_layers(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    num_layers = gm.config.num_layers
    if plan.num_layers != num_layers:
        raise CqilError(f"group_layers: plan is for {plan.num_layers} layers, the model has {num_layers}")
    for k, group in enumerate(plan.groups):
        _rewrite_group(gm.graph, [find_layer(gm, l) for l in group], k, plan)
    gm.meta["cqil.plan"] = plan
    gm.graph.lint()
    gm.recompile()
    return gm


def _rewrite_group(graph: fx.Graph, members: list[LayerNodes], k: int, plan: Plan):
    x = members[0].input
    old_nodes = [n for m in members for n in m.all]
    last = members[-1].output

    def tag(node, rank=None, layer=None, value=None, collective=None):
        node.meta["cqil.group"] = k
        if rank is not None:
            node.meta.update({"cqil.rank": rank, "cqil.layer": layer})
        if value is not None:
            node.meta["cqil.value"] = value
        if collective is not None:
            node.meta["cqil.collective"] = collective
        return node

    if k == 0 and not plan.replicate_outer:
        with graph.inserting_before(members[0].input_norm):
            x = tag(graph.call_function(broadcast, (x,)), value="group0.input", collective="broadcast")
    with graph.inserting_before(last):
        attn_out = []
        for i, m in enumerate(members):
            norm = tag(graph.call_module(m.input_norm.target, (x,)), i, m.layer)
            attn = tag(graph.call_module(m.attn.target, (norm, *m.attn.args[1:])), i, m.layer)
            a = tag(graph.call_function(operator.getitem, (attn, 0)), i, m.layer, value=f"group{k}.attn")
            m.key.replace_all_uses_with(tag(graph.call_function(operator.getitem, (attn, 1)), i, m.layer))
            m.value.replace_all_uses_with(tag(graph.call_function(operator.getitem, (attn, 2)), i, m.layer))
            attn_out.append(a)
        if plan.bypass:
            gathered = tag(graph.call_function(all_gather, tuple(attn_out)), collective="all_gather")
        deltas = []
        for i, (m, a) in enumerate(zip(members, attn_out)):
            bypass = None
            for j in plan.bypass_sources(i):
                term = tag(graph.call_function(operator.getitem, (gathered, j)), i, m.layer)
                bypass = term if bypass is None else tag(graph.call_function(operator.add, (bypass, term)), i, m.layer)
            h = tag(graph.call_function(operator.add, (x, a)), i, m.layer)
            if bypass is not None:
                h = tag(graph.call_function(operator.add, (h, bypass)), i, m.layer)
            post = tag(graph.call_module(m.post_norm.target, (h,)), i, m.layer)
            f = tag(graph.call_module(m.mlp.target, (post,)), i, m.layer)
            delta = a
            if bypass is not None and plan.semantics == "reference":
                delta = tag(graph.call_function(operator.add, (delta, bypass)), i, m.layer)
            deltas.append(tag(graph.call_function(operator.add, (delta, f)), i, m.layer,
                              value=f"group{k}.delta"))
        total = tag(graph.call_function(all_reduce_sum, tuple(deltas)), collective="all_reduce")
        out = tag(graph.call_function(operator.add, (x, total)), value=f"group{k}.output")
    last.replace_all_uses_with(out)
    for node in reversed(old_nodes):
        graph.erase_node(node)
