"""Run every rank's program in one thread, rank after rank, meeting at each collective.

The simplest faithful interpreter of a partition's programs: used to infer tensor shapes on the
meta device while compiling, and as a reference in tests. The engine's own executor
(`cqil.runtime.engine`) runs the ranks concurrently instead. Collectives combine values with
`+`, in rank order, so results are bit-identical to the single-graph reference.
"""

from __future__ import annotations

from typing import Callable

from cqil.errors import CqilError
from cqil.schedule import Step

RunSegment = Callable[[int, str, dict], dict]  # (rank, segment name, feeds) -> outputs


def run_lockstep(programs: dict[int, list[Step]], run_segment: RunSegment, envs: dict[int, dict]) -> dict[int, dict]:
    """Execute `programs`; `envs[rank]` holds the rank's inputs on entry and every value on exit."""
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
        apply_collective(steps, envs)
        for r in programs:
            pcs[r] += 1


def apply_collective(steps: dict[int, Step], envs: dict[int, dict]):
    """Perform one collective step, given each rank's step and environment."""
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
        total = values[0]
        for v in values[1:]:
            total = total + v
        for r in ranks:
            envs[r][steps[r].outputs[0]] = total
    else:
        raise CqilError(f"unknown collective {kind!r}")
