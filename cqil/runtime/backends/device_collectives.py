"""In-process collectives between rank threads whose values are torch tensors on CUDA devices."""

from __future__ import annotations

import torch

from cqil.program import rank_ordered_sum
from cqil.runtime.collectives import LocalCollectives


class DeviceCollectives(LocalCollectives):
    """`LocalCollectives` for tensors on CUDA devices, ordered by events instead of the host.

    The producer records an event on its stream when it enters a collective; after the barrier each
    rank makes its own stream wait for the others' events, brings their values to its device and
    combines them there in rank order (so every rank computes the same bits). Two events per rank,
    used in turn, suffice: a rank re-records one only after the next barrier, by which time every
    consumer has queued its wait on it.
    """

    def __init__(self, devices: list[torch.device], streams: list, timeout: float | None = 600.0):
        super().__init__(len(devices), timeout)
        self.devices, self.streams = devices, streams
        self._events = [[torch.cuda.Event(), torch.cuda.Event()] for _ in devices]
        self._turn = [0] * len(devices)

    def _combine(self):
        self._result = self._values  # each rank combines on its own device, after the barrier
        self._values = [None] * self.world_size

    def __call__(self, rank: int, kind: str, value):
        if self.world_size == 1:
            return super().__call__(rank, kind, value)
        event = None
        if value is not None:
            event = self._events[rank][self._turn[rank]]
            self._turn[rank] ^= 1
            event.record(self.streams[rank])
        values = super().__call__(rank, kind, (value, event))
        with torch.cuda.stream(self.streams[rank]):
            if kind == "broadcast":
                return self._receive(rank, 0, *values[0])
            local = [self._receive(rank, j, v, e) for j, (v, e) in enumerate(values)]
            return local if kind == "all_gather" else rank_ordered_sum(local)

    def _receive(self, rank: int, src: int, value: torch.Tensor, event) -> torch.Tensor:
        if src == rank:
            return value
        stream = self.streams[rank]
        stream.wait_event(event)
        if value.device == self.devices[rank]:
            value.record_stream(stream)  # keep the producer's allocator from reusing it too early
            return value
        # PyTorch copies between devices on the source device's current stream, after a two-way
        # barrier with ours (which has just waited for the producer): the order is right, and the
        # source stream must hold on to the memory until the copy is done.
        value.record_stream(torch.cuda.current_stream(value.device))
        return value.to(self.devices[rank], non_blocking=True)
