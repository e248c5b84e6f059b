"""A rank's program: the steps it runs, as recorded in the manifest (no torch needed to read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One step of a rank's program: run a segment, or take part in a collective.

    kind: "segment" (segment = its name), "broadcast" (rank 0 sends inputs[0], every rank receives
    it as outputs[0]),
    "all_gather" (sends inputs[0], receives outputs[j] from rank j), "all_reduce" (sends inputs[0],
    receives the rank-ordered sum as outputs[0]).
    """

    kind: str
    segment: str | None = None
    group: int | None = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if v not in (None, ())}

    @classmethod
    def from_dict(cls, d: dict) -> "Step":
        return cls(kind=d["kind"], segment=d.get("segment"), group=d.get("group"),
                   inputs=tuple(d.get("inputs", ())), outputs=tuple(d.get("outputs", ())))
