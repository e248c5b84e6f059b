"""A rank's program, the tensor names programs speak in, and the one rank-ordered sum.

A partition gives every rank a *program*: a list of `Step`s, each either a segment to run or a
collective to take part in. Programs are recorded in the manifest and need no torch to read.

Tensor names are declared here once and built by these functions everywhere (partition,
exporters, runtime, verification):

    input_ids, attention_mask, position_ids          model inputs        [B, T], [B, P+T], [B, T]
    past_key_values.{layer}.key|value                 KV cache in         [B, kv_heads, P, head_dim]
    present.{layer}.key|value                         KV cache out        [B, kv_heads, P+T, head_dim]
    logits                                            model output        [B, T, V] (rank 0)

Dynamic axes are named `batch`, `sequence` (T), `past_sequence` (P) and `total_sequence` (P+T).

`rank_ordered_sum` is how every all-reduce adds (the graph's reference, in-process threads, CUDA
streams, torch.distributed): rank 0's value + rank 1's + ..., in that order, so that every
implementation gives the bits of the single-graph reference. `run_lockstep` runs all ranks'
programs in one thread; the ONNX exporter uses it to infer shapes on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cqil.errors import CqilError

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"
KV_KINDS = ("key", "value")
AXES = ("batch", "sequence", "past_sequence", "total_sequence")
STEP_KINDS = ("segment", "broadcast", "all_gather", "all_reduce")
COLLECTIVE_KINDS = STEP_KINDS[1:]


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def cache_entries(layers) -> list[tuple[int, str]]:
    """(layer, kind) of every KV tensor of `layers`: the order of a model's past/present tuples."""
    return [(layer, kind) for layer in layers for kind in KV_KINDS]


def rank_ordered_sum(values):
    """values[0] + values[1] + ... in rank order (numpy arrays or torch tensors alike)."""
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


@dataclass(frozen=True)
class Step:
    """One step of a rank's program: run a segment, or take part in a collective.

    kind: "segment" (segment = its name), "broadcast" (rank 0 sends inputs[0], every rank receives
    it as outputs[0]), "all_gather" (sends inputs[0], receives outputs[j] from rank j),
    "all_reduce" (sends inputs[0], receives the rank-ordered sum as outputs[0]).
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

    def sends(self, rank: int) -> bool:
        """Whether `rank` contributes a value to this collective (a broadcast's source is rank 0)."""
        return self.kind != "segment" and (self.kind != "broadcast" or rank == 0)


RunSegment = Callable[[int, str, dict], dict]  # (rank, segment name, env) -> outputs


def run_lockstep(programs: dict[int, list[Step]], run_segment: RunSegment, envs: dict[int, dict]) -> dict[int, dict]:
    """Run every rank's program in this thread, rank after rank, meeting at each collective.

    `envs[rank]` holds the rank's inputs on entry and every value on exit.
    """
    pcs = {r: 0 for r in programs}
    while True:
        for r, program in programs.items():
            while pcs[r] < len(program) and program[pcs[r]].kind == "segment":
                envs[r].update(run_segment(r, program[pcs[r]].segment, envs[r]))
                pcs[r] += 1
        pending = [r for r in programs if pcs[r] < len(programs[r])]
        if not pending:
            return envs
        if len(pending) != len(programs):
            raise CqilError(f"ranks {sorted(set(programs) - set(pending))} finished while others wait in a collective")
        steps = {r: programs[r][pcs[r]] for r in programs}
        kinds = {(s.kind, s.group) for s in steps.values()}
        if len(kinds) != 1:
            raise CqilError(f"ranks disagree on the next collective: {kinds}")
        _apply_collective(steps, envs)
        for r in programs:
            pcs[r] += 1


def _apply_collective(steps: dict[int, Step], envs: dict[int, dict]):
    ranks = sorted(steps)
    kind = steps[ranks[0]].kind
    if kind == "broadcast":
        value = envs[ranks[0]][steps[ranks[0]].inputs[0]]
        for r in ranks:
            envs[r][steps[r].outputs[0]] = value
        return
    values = [envs[r][steps[r].inputs[0]] for r in ranks]
    if kind == "all_gather":
        for r in ranks:
            envs[r].update(zip(steps[r].outputs, values))
    elif kind == "all_reduce":
        total = rank_ordered_sum(values)
        for r in ranks:
            envs[r][steps[r].outputs[0]] = total
    else:
        raise CqilError(f"unknown collective {kind!r}")
