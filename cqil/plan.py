"""The CQIL plan: which layers run together, on which rank.

All rank arithmetic lives here. A `Plan` is an immutable value that flows from the CLI through the
passes into the engine manifest and back out of it in the runtime.

Worked example (LLaMA-7B, the authors' p=2 setting)::

    >>> plan = Plan(num_layers=32, p=2, start=12, end=30)
    >>> len(plan.groups), plan.groups[0], plan.groups[-1]
    (9, (12, 13), (28, 29))
    >>> plan.depth            # 12 prefix layers + 9 groups + 2 suffix layers
    23
    >>> plan.rank_of(13), plan.rank_of(14), plan.rank_of(5)
    (1, 0, None)

Layer `start + k*p + i` belongs to group k and runs on rank i. Layers outside `[start, end)` are
"outer" layers: they run on rank 0, or on every rank when `replicate_outer` is set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from cqil.errors import CqilError

SEMANTICS = ("once", "reference")


@dataclass(frozen=True)
class Plan:
    """CQIL layout of a decoder of `num_layers` layers.

    - `p`: layers per group = number of ranks. p=1 is the original model.
    - `start`, `end`: the CQIL range `[start, end)`; `end - start` must be a multiple of `p`.
    - `bypass`: bypass distance d (0 <= d < p); layer i of a group adds the attention outputs of
      the d members before it to its MLP input.
    - `semantics`: "once" (bypass enters the residual once, through the MLP input) or "reference"
      (the authors' released code: the bypass also enters the group's residual sum).
    - `replicate_outer`: run layers outside the range on every rank instead of rank 0 only.
    """

    num_layers: int
    p: int
    start: int
    end: int
    bypass: int = 0
    semantics: str = "once"
    replicate_outer: bool = False
    groups: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("num_layers", "p", "start", "end", "bypass"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise CqilError(f"plan: {name} must be an integer, got {value!r}")
        L, p, s, e, d = self.num_layers, self.p, self.start, self.end, self.bypass
        if L < 1:
            raise CqilError(f"plan: the model must have at least 1 layer, got num_layers={L}")
        if p < 1:
            raise CqilError(f"plan: p must be >= 1, got p={p}")
        if not 0 <= s <= e <= L:
            raise CqilError(
                f"plan: range [start={s}, end={e}) must satisfy 0 <= start <= end <= num_layers={L}"
            )
        if (e - s) % p:
            lo = e - (e - s) // p * p
            raise CqilError(
                f"plan: end - start = {e - s} is not a multiple of p={p}; "
                f"try --start {lo} --end {e} or --start {s} --end {s + (e - s) // p * p}"
            )
        if not 0 <= d < p:
            raise CqilError(f"plan: bypass distance d={d} must satisfy 0 <= d < p={p}")
        if self.semantics not in SEMANTICS:
            raise CqilError(
                f"plan: bypass semantics must be one of {', '.join(SEMANTICS)}, got {self.semantics!r}"
            )
        if d == 0:  # without a bypass both semantics are the same model: one spelling for it
            object.__setattr__(self, "semantics", "once")
        groups = tuple(tuple(range(g, g + p)) for g in range(s, e, p)) if p > 1 else ()
        object.__setattr__(self, "groups", groups)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def default(cls, num_layers: int, p: int, **kwargs) -> "Plan":
        """The default range: end = L-2, start = smallest value >= 3L/8 with (end-start) % p == 0.

        32 layers: p=2 -> [12, 30) (the authors' S12 E30), p=4 -> [14, 30) (S14 E30).
        """
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise CqilError(f"plan: p must be an integer >= 1, got p={p!r}")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise CqilError(f"plan: num_layers must be an integer >= 1, got num_layers={num_layers!r}")
        end = max(num_layers - 2, 0)
        start = min(math.ceil(3 * num_layers / 8), end)
        while (end - start) % p:
            start += 1
        return cls(num_layers=num_layers, p=p, start=start, end=end, **kwargs)

    @classmethod
    def from_authors_config(cls, num_layers: int, cqil_layers, d: int = 0, **kwargs) -> "Plan":
        """Plan from the authors' HF-config keys: `cqil_layers` (list of layer groups) and `d`."""
        try:
            groups = [[int(x) for x in g] for g in cqil_layers]
        except (TypeError, ValueError):
            raise CqilError(f"config: cqil_layers must be a list of lists of layer indices, got {cqil_layers!r}")
        if not groups:
            return cls(num_layers=num_layers, p=1, start=0, end=0, **kwargs)
        if not groups[0]:
            raise CqilError(f"config: cqil_layers {cqil_layers!r} holds an empty group")
        try:
            d = int(d)
        except (TypeError, ValueError):
            raise CqilError(f"config: d (the bypass distance) must be an integer, got {d!r}")
        p = len(groups[0])
        start = groups[0][0]
        expected = [list(range(start + k * p, start + (k + 1) * p)) for k in range(len(groups))]
        if groups != expected:
            raise CqilError(
                f"config: cqil_layers {groups} is not a run of consecutive groups of equal size; "
                f"expected {expected}"
            )
        return cls(num_layers=num_layers, p=p, start=start, end=start + p * len(groups),
                   bypass=d, **kwargs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("groups")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        known = {"num_layers", "p", "start", "end", "bypass", "semantics", "replicate_outer"}
        unknown = set(d) - known
        if unknown:
            raise CqilError(f"plan: unknown keys {sorted(unknown)}")
        missing = {"num_layers", "p", "start", "end"} - set(d)
        if missing:
            raise CqilError(f"plan: missing keys {sorted(missing)}")
        return cls(**d)

    # -- ownership ----------------------------------------------------------------------------

    def in_range(self, layer: int) -> bool:
        return bool(self.groups) and self.start <= layer < self.end

    def group_of(self, layer: int) -> int | None:
        """Index of the group holding `layer`, or None for an outer layer."""
        self._check_layer(layer)
        return (layer - self.start) // self.p if self.in_range(layer) else None

    def rank_of(self, layer: int) -> int | None:
        """Rank that runs `layer`; None for an outer layer (rank 0, or all ranks if replicated)."""
        self._check_layer(layer)
        return (layer - self.start) % self.p if self.in_range(layer) else None

    def layers_of(self, rank: int) -> tuple[int, ...]:
        """Every layer whose weights `rank` holds, outer layers included where they run there."""
        if not 0 <= rank < self.p:
            raise CqilError(f"plan: rank {rank} is outside 0..{self.p - 1}")
        outer = rank == 0 or self.replicate_outer
        return tuple(l for l in range(self.num_layers)
                     if (self.rank_of(l) == rank) or (self.rank_of(l) is None and outer))

    def bypass_sources(self, i: int) -> tuple[int, ...]:
        """Group members whose attention outputs member i adds to its MLP input: i-1 .. i-d."""
        return tuple(i - k for k in range(1, min(self.bypass, i) + 1))

    @property
    def prefix(self) -> tuple[int, ...]:
        return tuple(range(self.start)) if self.groups else tuple(range(self.num_layers))

    @property
    def suffix(self) -> tuple[int, ...]:
        return tuple(range(self.end, self.num_layers)) if self.groups else ()

    @property
    def depth(self) -> int:
        """Sequential depth: layers that must run one after another."""
        return self.num_layers - (self.p - 1) * len(self.groups)

    def collectives(self) -> list[str]:
        """Collectives of one forward pass, in order, e.g. ['broadcast', 'all_gather[0]', 'all_reduce[0]']."""
        out = []
        if self.groups and not self.replicate_outer:
            out.append("broadcast")  # the group input leaves rank 0 once
        for k in range(len(self.groups)):
            if self.bypass:
                out.append(f"all_gather[{k}]")
            out.append(f"all_reduce[{k}]")
        return out

    def _check_layer(self, layer: int):
        if not 0 <= layer < self.num_layers:
            raise CqilError(f"plan: layer {layer} is outside 0..{self.num_layers - 1}")

    def __str__(self) -> str:
        if not self.groups:
            return f"Plan(L={self.num_layers}, p={self.p}, no CQIL groups, depth {self.depth})"
        return (f"Plan(L={self.num_layers}, p={self.p}, S{self.start} E{self.end}, d={self.bypass}"
                f"{'/' + self.semantics if self.bypass else ''}, {len(self.groups)} groups, "
                f"depth {self.num_layers}->{self.depth}{', outer replicated' if self.replicate_outer else ''})")


def check_parallel(plan: Plan):
    """Refuse a plan with p > 1 that runs nothing in parallel (no group in its range), with a way out."""
    if plan.p == 1 or plan.groups:
        return
    L, p = plan.num_layers, plan.p
    best = next((q for q in range(min(p, L), 1, -1) if Plan.default(L, q).groups), None)
    largest = f"the largest p the default range takes is {best}" if best else "no p > 1 fits the default range"
    if p > L:
        raise CqilError(f"plan: p={p} is larger than the model's {L} layers, so no group fits; {largest}")
    end = L - 2 if p <= L - 2 else L
    raise CqilError(f"plan: the range [{plan.start}, {plan.end}) holds no group of {p} layers, so nothing would run "
                    f"in parallel; give a range that does (e.g. --start {end - p} --end {end}), or a smaller p "
                    f"({largest})")


def resolve_plan(num_layers: int, p: int | None = None, start: int | None = None, end: int | None = None,
                 bypass: int | None = None, semantics: str | None = None, replicate_outer: bool = False,
                 authors: dict | None = None) -> tuple[Plan, str]:
    """The plan asked for, and where it came from: 'flags', 'default range' or 'checkpoint config (cqil_layers)'.

    `authors` holds the checkpoint config's `cqil_layers` / `d` keys when it has them; without
    --start/--end they give the plan. `semantics` defaults to "once", except for a plan read from
    `cqil_layers`: the authors' released adapters were trained with "reference". A plan with p > 1
    must hold a group (`check_parallel`).
    """
    authors = authors or {}
    if start is None and end is None and "cqil_layers" in authors:
        plan = Plan.from_authors_config(num_layers, authors["cqil_layers"],
                                        authors.get("d", 0) if bypass is None else bypass,
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
        plan, source = Plan.default(num_layers, p, bypass=bypass, **common), "default range"
    else:
        default = Plan.default(num_layers, p)
        end = default.end if end is None else end
        if start is None:
            start = end - (end - min(default.start, end)) // p * p
        plan, source = Plan(num_layers, p, start, end, bypass=bypass, **common), "flags"
    check_parallel(plan)
    return plan, source
