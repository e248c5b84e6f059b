"""How alike are the inputs of nearby layers? The measurement behind CQIL's choice of range.

CQIL lets layer l of a group read the group's input x_g instead of its own input x_l, so the error
it makes at layer l grows as cos(x_l, x_g) falls. This module runs the original model on held-out
text, records every decoder layer's input x_l (a forward pre-hook; nothing is traced) and averages,
over tokens, the cosine similarity of x_l with x_{l-j} for j = 1 .. p-1:

    back[j-1][l] = mean_t cos(x_l[t], x_{l-j}[t])          (None where l < j)
    adjacent[l]  = back[0][l+1] = cos(x_l, x_{l+1}),        l = 0 .. L-2

A plan's member at offset i = (l - start) % p reads x_{l-i}, so its similarity is back[i-1][l].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cqil.model.model import CausalLM
from cqil.plan import Plan

DEFAULT_THRESHOLD = 0.9


@dataclass(frozen=True)
class Similarity:
    """Token-averaged cosine similarities of layer inputs (see the module docstring)."""

    num_layers: int
    tokens: int
    back: tuple[tuple[float | None, ...], ...]  # back[j-1][l] = cos(x_l, x_{l-j})

    @property
    def adjacent(self) -> tuple[float, ...]:
        """cos(x_l, x_{l+1}) for l = 0 .. L-2."""
        return tuple(self.back[0][1:])

    def to_group_start(self, plan: Plan) -> list[float | None]:
        """Per layer: cos(x_l, input of l's group) under `plan`; 1.0 for a group start, None outside."""
        out: list[float | None] = []
        for layer in range(self.num_layers):
            if not plan.in_range(layer):
                out.append(None)
                continue
            offset = plan.rank_of(layer)
            out.append(1.0 if offset == 0 else self.back[offset - 1][layer])
        return out

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "tokens": self.tokens, "adjacent": list(self.adjacent),
                "back": {str(j + 1): list(row) for j, row in enumerate(self.back)}}


def measure(model: CausalLM, ids: torch.Tensor, seq_len: int, max_offset: int = 1) -> Similarity:
    """Similarities of layer inputs up to `max_offset` layers apart, over `ids` cut into windows of `seq_len`."""
    L = model.config.num_layers
    max_offset = max(1, min(max_offset, L - 1))
    inputs: list[torch.Tensor | None] = [None] * L

    def record(layer):
        def hook(module, args):
            inputs[layer] = args[0][0].float()  # [W, H]
        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(model.model.layers)]
    sums = torch.zeros(max_offset, L, dtype=torch.float64)
    tokens = 0
    device = model.lm_head.weight.device
    try:
        with torch.no_grad():
            for begin in range(0, len(ids), seq_len):
                window = ids[begin:begin + seq_len][None].to(device)  # [1, W]
                W = window.shape[1]
                model(window, torch.ones_like(window), torch.arange(W, device=device)[None], model.empty_cache(1))
                for j in range(1, max_offset + 1):
                    for layer in range(j, L):
                        cos = F.cosine_similarity(inputs[layer], inputs[layer - j], dim=-1)  # [W]
                        sums[j - 1, layer] += cos.clamp(-1.0, 1.0).double().sum().cpu()
                tokens += W
    finally:
        for h in handles:
            h.remove()
    means = (sums / tokens).tolist()
    back = tuple(tuple(None if layer < j + 1 else means[j][layer] for layer in range(L)) for j in range(max_offset))
    return Similarity(num_layers=L, tokens=tokens, back=back)


@dataclass(frozen=True)
class Suggestion:
    plan: Plan
    min_similarity: float | None  # over the members that do not start a group
    mean_similarity: float | None
    met_threshold: bool
    rule: str

    def to_dict(self) -> dict:
        return {"start": self.plan.start, "end": self.plan.end, "p": self.plan.p,
                "min_similarity": self.min_similarity, "mean_similarity": self.mean_similarity,
                "met_threshold": self.met_threshold, "rule": self.rule, "plan": self.plan.to_dict()}


def suggest_range(sim: Similarity, p: int, threshold: float = DEFAULT_THRESHOLD) -> Suggestion:
    """The suggested CQIL range [start, end) for `p`.

    Rule: among ranges with end <= L-2 (the last two layers stay sequential, as in the authors' S12
    E30 / S14 E30 and `Plan.default`) and end - start a multiple of p, take the **longest range in
    which every layer's input is at least `threshold`-similar to its group's input**; ties go to
    the higher mean similarity, then to the earlier start. A threshold on the worst member, not the mean, keeps a range from
    swallowing one layer (often layer 0 or 1, whose input is nearly the raw embedding) that CQIL
    would break. When no single group meets the threshold, the group with the highest mean
    similarity is suggested and `met_threshold` is False; a model with fewer than p + 2 layers gets
    the empty range (the original model).
    """
    L = sim.num_layers
    if p - 1 > len(sim.back):
        raise ValueError(f"similarities were measured up to offset {len(sim.back)}, p={p} needs {p - 1}")
    max_end = L - 2
    best = None  # (key, start, end, min, mean)
    for start in range(0, max_end):
        for end in range(start + p, max_end + 1, p):
            members = [sim.back[(l - start) % p - 1][l] for l in range(start, end) if (l - start) % p]
            lo, mean = min(members), sum(members) / len(members)
            ok = lo >= threshold
            key = (ok, end - start if ok else 0, mean)
            if best is None or key > best[0]:
                best = (key, start, end, lo, mean)
            if not ok:
                break  # a longer range from this start holds the same failing member
    if best is None:
        rule = f"the model has {L} layers: no group of {p} fits below layer {max_end}; empty range"
        return Suggestion(Plan(L, p, 0, 0), None, None, False, rule)
    (ok, _, _), start, end, lo, mean = best
    if ok:
        rule = f"longest range with end <= L-2 whose every layer has similarity >= {threshold} to its group input"
    else:
        rule = f"no group reaches similarity {threshold}; the single group with the highest mean similarity"
    return Suggestion(Plan(L, p, start, end), lo, mean, ok, rule)
