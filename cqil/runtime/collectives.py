"""In-process collectives between rank threads.

Every rank deposits its value and waits at one barrier; the last thread to arrive combines the
values (`rank_ordered_sum`, so the result is bit-identical to the single-graph reference) before any
thread is released. A rank that fails aborts the barrier, so the others stop waiting at once
instead of hanging.
"""

from __future__ import annotations

import threading

from cqil.errors import CqilError
from cqil.program import rank_ordered_sum


class LocalCollectives:
    def __init__(self, world_size: int, timeout: float | None = 600.0):
        self.world_size = world_size
        self.timeout = timeout
        self._values: list = [None] * world_size
        self._kind = None
        self._result = None
        self._barrier = threading.Barrier(world_size, action=self._combine, timeout=timeout)

    def _combine(self):
        values = self._values
        if self._kind == "all_reduce":
            self._result = rank_ordered_sum(values)
        elif self._kind == "all_gather":
            self._result = list(values)
        else:  # broadcast from rank 0
            self._result = values[0]
        self._values = [None] * self.world_size

    def __call__(self, rank: int, kind: str, value):
        """Take part in collective `kind` with `value`; returns the combined result.

        For a broadcast, ranks other than 0 pass an empty array of the expected shape and dtype
        (unused here; a receive buffer for collectives between processes).
        """
        if self.world_size == 1:
            return [value] if kind == "all_gather" else value
        self._values[rank] = value
        self._kind = kind
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise CqilError(f"rank {rank}: {kind} abandoned (another rank failed or timed out)") from None
        # Safe to read without a second barrier: the next combine (which overwrites _result) runs
        # only once every rank has arrived at the next collective, i.e. after all have read this one.
        return self._result

    def share_tokens(self, tokens, batch: int):
        """Rank 0's chosen tokens (int64 [batch]; None on other ranks), for every rank.

        In one process they are already shared; across processes (`cqil.runtime.dist`) the other
        ranks receive them into a buffer of `batch` tokens.
        """
        return tokens

    def abort(self):
        self._barrier.abort()

    def reset(self):
        self._barrier.reset()
        self._values = [None] * self.world_size
