"""In-process collectives between rank threads.

Every rank deposits its value and waits at one barrier; the last thread to arrive combines the
values (`rank_ordered_sum`, so the result is bit-identical to the single-graph reference) before any
thread is released. A rank that fails aborts the barrier (`abort(rank)`), so the others stop
waiting at once and raise `Abandoned`, naming it; a rank that never comes is named when the
barrier's timeout expires.
"""

from __future__ import annotations

import threading

from cqil.errors import CqilError
from cqil.program import rank_ordered_sum


class Abandoned(CqilError):
    """A rank gave up a collective because another rank failed or never came: a victim, not a cause
    (and not bad input: exit status 1)."""

    exit_code = 1


class LocalCollectives:
    def __init__(self, world_size: int, timeout: float | None = 600.0):
        self.world_size = world_size
        self.timeout = timeout
        self._values: list = [None] * world_size
        self._kind = None
        self._result = None
        self._arrived: set[int] = set()  # ranks waiting in the current collective
        self._failed: int | None = None  # the rank whose failure aborted it
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
        self._arrived = set()

    def __call__(self, rank: int, kind: str, value):
        """Take part in collective `kind` with `value`; returns the combined result.

        For a broadcast, ranks other than 0 pass an empty array of the expected shape and dtype
        (unused here; a receive buffer for collectives between processes).
        """
        if self.world_size == 1:
            return [value] if kind == "all_gather" else value
        self._values[rank] = value
        self._kind = kind
        self._arrived.add(rank)
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            if self._failed is not None:
                raise Abandoned(f"rank {rank}: {kind} abandoned: rank {self._failed} failed") from None
            missing = sorted(set(range(self.world_size)) - self._arrived)
            raise Abandoned(f"rank {rank}: {kind} timed out after {self.timeout:g} s waiting for rank(s) "
                            f"{', '.join(map(str, missing))}, which hang") from None
        # Safe to read without a second barrier: the next combine (which overwrites _result) runs
        # only once every rank has arrived at the next collective, i.e. after all have read this one.
        return self._result

    def share_tokens(self, tokens, batch: int):
        """Rank 0's chosen tokens (int64 [batch]; None on other ranks), for every rank.

        In one process they are already shared; across processes (`cqil.runtime.dist`) the other
        ranks receive them into a buffer of `batch` tokens.
        """
        return tokens

    def abort(self, failed_rank: int | None = None):
        """Wake every rank waiting in a collective: `failed_rank` failed (the first one is kept)."""
        if self._failed is None:
            self._failed = failed_rank
        self._barrier.abort()

    def reset(self):
        self._barrier.reset()
        self._values = [None] * self.world_size
        self._arrived, self._failed = set(), None
