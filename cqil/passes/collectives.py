"""Collective operations as graph nodes.

In the CQIL GraphModule every rank's values live in one graph, so on a single device a collective
is a plain function of all ranks' tensors: `all_reduce_sum(d_0, ..., d_{p-1})` returns their sum,
`all_gather(a_0, ..., a_{p-1})` returns them all, `broadcast(x)` returns x (computed on rank 0).
The partition pass cuts the graph at these nodes; the runtime then performs the real collective
between ranks with the same `rank_ordered_sum`, so its result is bit-identical to this reference.
"""

from __future__ import annotations

import torch

from cqil.program import rank_ordered_sum


def all_reduce_sum(*tensors: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's tensor, added in rank order."""
    return rank_ordered_sum(tensors)


def all_gather(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's tensor, indexed by rank."""
    return tuple(tensors)


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor, on every rank."""
    return tensor


COLLECTIVES = {all_reduce_sum: "all_reduce", all_gather: "all_gather", broadcast: "broadcast"}


def collective_kind(node) -> str | None:
    """'all_reduce' / 'all_gather' / 'broadcast' for a collective node, else None."""
    return COLLECTIVES.get(node.target) if node.op == "call_function" else None
