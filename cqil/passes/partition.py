"""Partition the CQIL GraphModule at its collectives into per-rank segments and programs.

Requires: `group_layers` has run (collective nodes, `cqil.rank` / `cqil.layer` tags, plan in
`gm.meta["cqil.plan"]`). Guarantees: every rank gets a *program*, a list of steps that is either
a segment to run or a collective; all ranks see the same collectives in the same order. A segment
is a GraphModule of its own whose inputs and outputs are named tensors:

- model inputs: `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{l}.key|value`
- model outputs: `logits` (rank 0), `present.{l}.key|value` (the rank owning layer l)
- collective values: `group{k}.input` (broadcast), `group{k}.attn` -> `group{k}.attn.{j}`
  (all_gather), `group{k}.delta` -> `group{k}.sum` (all_reduce)
- values a rank carries from one of its segments to a later one (rope tables, the mask, a group
  input): their fx node name.

Which rank computes a node: its `cqil.rank`; outer layers on rank 0 (prefix layers on every rank
with `replicate_outer`); everything else (embedding, rope, mask, group outputs, final norm,
lm_head) on each rank that needs it, found by walking back from what the rank must produce and
stopping at collectives, whose results it receives.

Example, p=2, d=0, outer layers on rank 0::

    rank 0: seg0 (embed, layers 0..S-1) | broadcast | seg1 (group 0, rank-0 layer) | all_reduce[0] | ... | segN (final norm, lm_head)
    rank 1:                               broadcast | seg0 (group 0, rank-1 layer) | all_reduce[0] | ...

With `max_segment_bytes`, a run between collectives whose weights exceed the cap is further cut into
consecutive segments at layer boundaries (before a decoder layer, or before a module outside the
layers such as lm_head), so that an exporter never holds more than about the cap in weights. Values
crossing such a cut are carried like any other; no collective sits between the pieces. LLaMA-2-7B in
fp16 (~405 MB a layer) with a 1 GiB cap, p=4, S14 E30::

    rank 0: seg0 (embed, layers 0-1) | seg1 (layers 2-3) | ... | seg6 (layers 12-13) | broadcast | ...
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from cqil.errors import CqilError
from cqil.passes.collectives import collective_kind
from cqil.plan import Plan
from cqil.program import KV_KINDS, LOGITS, Step, past_name, present_name

MAX_SEGMENT_BYTES = 1 << 30  # the compile's default cap on one segment's weights


@dataclass
class Segment:
    rank: int
    index: int  # position among the rank's segments
    gm: fx.GraphModule  # forward(*inputs) -> tuple(outputs)
    inputs: list[str]
    outputs: list[str]
    layers: list[int]  # decoder layers whose weights this segment uses

    @property
    def name(self) -> str:
        return f"seg{self.index}"


@dataclass
class Partition:
    plan: Plan
    segments: dict[int, list[Segment]] = field(default_factory=dict)  # rank -> segments
    programs: dict[int, list[Step]] = field(default_factory=dict)  # rank -> steps


def _is_past(node: fx.Node) -> bool:
    """`past_key_values[j]`: one tensor of the KV-cache input tuple."""
    return (node.target is operator.getitem and node.args[0].op == "placeholder"
            and node.args[0].target == "past_key_values")


def value_name(node: fx.Node) -> str:
    """The tensor name of a node's value, as segments and the manifest know it."""
    if node.op == "placeholder":
        return node.name
    if _is_past(node):
        j = node.args[1]
        return past_name(j // 2, KV_KINDS[j % 2])
    if node.target is operator.getitem and collective_kind(node.args[0]) == "all_gather":
        return f"{node.args[0].args[node.args[1]].meta['cqil.value']}.{node.args[1]}"
    kind = collective_kind(node)
    if kind == "all_reduce":
        return f"group{node.meta['cqil.group']}.sum"
    if kind == "broadcast":
        return node.meta["cqil.value"]
    return node.meta.get("cqil.value", node.name)


def _is_received(node: fx.Node) -> bool:
    """Values a segment takes as input rather than computes: model inputs and collective results."""
    return (node.op == "placeholder" or collective_kind(node) is not None
            or _is_past(node)
            or (node.target is operator.getitem and collective_kind(node.args[0]) == "all_gather"))


def _graph_outputs(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Model outputs: logits and the presents, by producing node."""
    (logits, presents), = gm.graph.output_node().args
    names = {logits: LOGITS}
    for j, node in enumerate(presents):
        names[node] = present_name(j // 2, KV_KINDS[j % 2])
    return names


def _owners(node: fx.Node, plan: Plan) -> set[int]:
    """Ranks that must compute `node` for its own sake (not because another node needs it)."""
    if "cqil.rank" in node.meta:
        return {node.meta["cqil.rank"]}
    layer = node.meta.get("cqil.layer")
    if layer is not None:  # an outer layer
        prefix = not plan.groups or layer < plan.start
        return set(range(plan.p)) if plan.replicate_outer and prefix else {0}
    return set()


def partition(gm: fx.GraphModule, plan: Plan | None = None, max_segment_bytes: int | None = None) -> Partition:
    """Segments and programs for every rank; `max_segment_bytes` caps a segment's weights (see above).

    The cap is exceeded only by a segment holding a single unit that alone is larger: one decoder
    layer's share of the run, or one module outside the layers.
    """
    if max_segment_bytes is not None and max_segment_bytes < 1:
        raise CqilError(f"partition: max_segment_bytes must be positive, got {max_segment_bytes}")
    plan = plan or gm.meta.get("cqil.plan")
    if plan is None:
        raise CqilError("partition: the graph carries no plan; run group_layers first")
    nodes = list(gm.graph.nodes)
    outputs = _graph_outputs(gm)
    result = Partition(plan)
    for rank in range(plan.p):
        roots = [n for n in nodes if rank in _owners(n, plan) and not _is_received(n)]
        if rank == 0:  # rank 0 also makes the logits and what it broadcasts (the embedding, if start=0)
            roots.append(next(n for n, name in outputs.items() if name == LOGITS))
            roots += [n.args[0] for n in nodes if collective_kind(n) == "broadcast" and not _is_received(n.args[0])]
        needed = _closure(roots)
        result.segments[rank], result.programs[rank] = _split(gm, nodes, needed, rank, outputs, max_segment_bytes)
    return result


def _closure(roots: list[fx.Node]) -> set[fx.Node]:
    needed, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n in needed or _is_received(n):
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return needed


def _split(gm, nodes, needed, rank, outputs, max_segment_bytes=None):
    """Cut the rank's nodes (in graph order) at every collective, and by size, into segments and steps."""
    runs, steps, current = [], [], []

    def close_run():
        for piece in _cut_by_size(gm, current, max_segment_bytes):
            runs.append(piece)
            steps.append(len(runs) - 1)

    for n in nodes:
        kind = collective_kind(n)
        if kind is None:
            if n in needed:
                current.append(n)
            continue
        if current:
            close_run()
            current = []
        if kind == "broadcast":
            steps.append(Step("broadcast", group=0, inputs=(value_name(n.args[0]),), outputs=(value_name(n),)))
        elif kind == "all_gather":
            k = n.meta["cqil.group"]
            steps.append(Step("all_gather", group=k, inputs=(value_name(n.args[rank]),),
                              outputs=tuple(f"{value_name(a)}.{j}" for j, a in enumerate(n.args))))
        else:
            steps.append(Step("all_reduce", group=n.meta["cqil.group"], inputs=(value_name(n.args[rank]),),
                              outputs=(value_name(n),)))
    if current:
        close_run()

    # what the rank sends: its all_gather / all_reduce contributions, and (rank 0) the broadcast source
    sent = {s.inputs[0] for s in steps if isinstance(s, Step) and s.sends(rank)}
    segment_of = {n: i for i, run in enumerate(runs) for n in run}
    segments = []
    for i, run in enumerate(runs):
        members = set(run)
        outs = []
        for n in run:
            used_later = any(segment_of.get(u, -1) > i for u in n.users if u in segment_of)
            name = value_name(n)
            if used_later or n in outputs or name in sent:
                outs.append(n)
        segments.append(_build_segment(gm, run, members, outs, outputs, rank, i))
    program = [Step("segment", segment=f"seg{s}") if isinstance(s, int) else s for s in steps]
    return segments, program


def _node_weights(gm: fx.GraphModule, node: fx.Node) -> dict[int, int]:
    """The parameters a node uses, id -> bytes (ids, so that tied weights count once).

    Buffers (rope frequencies) are left out: they are tiny and recomputed, not weights to stream.
    """
    if node.op == "call_module":
        params = gm.get_submodule(node.target).parameters()
    elif node.op == "get_attr":
        owner, _, attr = node.target.rpartition(".")
        params = [getattr(gm.get_submodule(owner), attr)]
    else:
        return {}
    return {id(t): t.numel() * t.element_size() for t in params if isinstance(t, torch.nn.Parameter)}


def _cut_by_size(gm: fx.GraphModule, run: list[fx.Node], max_bytes: int | None) -> list[list[fx.Node]]:
    """Cut a run into consecutive pieces whose weights stay under `max_bytes`.

    A cut may fall only where a unit starts: a decoder layer (nodes sharing `cqil.layer`) or a
    module outside the layers that holds weights (embedding, final norm, lm_head). Nodes without
    weights and outside the layers (rope, mask, residual additions) stay with the unit before them.
    """
    if max_bytes is None:
        return [run]

    def unit(n: fx.Node):
        layer = n.meta.get("cqil.layer")
        if layer is not None:
            return "layer", layer
        return ("node", n.name) if _node_weights(gm, n) else None

    unit_weights: dict = {}
    for n in run:
        if (key := unit(n)) is not None:
            unit_weights.setdefault(key, {}).update(_node_weights(gm, n))
    pieces, piece, held, started = [], [], {}, set()
    for n in run:
        key = unit(n)
        if key is not None and key not in started:
            started.add(key)
            weights = unit_weights[key]
            added = sum(b for i, b in weights.items() if i not in held)
            if held and sum(held.values()) + added > max_bytes:
                pieces.append(piece)
                piece, held = [], {}
            held.update(weights)
        piece.append(n)
    pieces.append(piece)
    return pieces


def _build_segment(gm, run, members, outs, model_outputs, rank, index) -> Segment:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n in members:
                raise CqilError(f"partition: node {n.name} used before it is computed")
            name = value_name(n)
            inputs.append(name)
            env[n] = graph.placeholder(_identifier(name))
        return env[n]

    for n in run:
        env[n] = graph.node_copy(n, lookup)
    names = [model_outputs.get(n, value_name(n)) for n in outs]
    graph.output(tuple(env[n] for n in outs))
    seg_gm = fx.GraphModule(gm, graph, f"Rank{rank}Seg{index}")
    layers = sorted({n.meta["cqil.layer"] for n in run if n.meta.get("cqil.layer") is not None})
    if not names:
        raise CqilError(f"partition: rank {rank} segment {index} produces nothing")
    return Segment(rank, index, seg_gm, inputs, names, layers)


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
