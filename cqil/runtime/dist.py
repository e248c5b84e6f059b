"""Collectives between rank processes over torch.distributed (gloo on CPU, NCCL with CUDA).

`DistCollectives` has `LocalCollectives`' interface, so `Engine(dir, ranks=[rank],
collectives=DistCollectives(rank, p))` runs one rank per process and holds only that rank's
segments. Values are the backend's numpy arrays, sent as `torch.from_numpy` views (no copies on
CPU); with a CUDA device (NCCL) they are staged through it.

    all_reduce    all_gather + a local sum in rank order (bit-identical to the in-process engine)
    all_gather    the bypass exchange: every rank's value, as a list indexed by rank
    broadcast     from rank 0, into the receive buffer the engine sized from the manifest
    share_tokens  broadcast of rank 0's chosen int64 tokens [batch]

Failures: every collective is bounded by `timeout` (gloo's own op timeout). A peer that exits
breaks the connection at once; one that hangs is noticed when the timeout expires. Either way
the collective raises a `CqilError` naming the rank(s) that stopped. With two ranks that is the
other one. With more, each rank publishes a heartbeat (beat count and collectives entered) to the
rendezvous store every `heartbeat` seconds; on a failure the survivor compares two readings:
ranks whose beat stopped died (or were stopped), ranks still beating but behind this collective
are stuck before it, ranks that reported the failure themselves are fellow victims. When no rank
stands out, every other rank is named as a suspect, and the message says so. A failed process
group cannot be reused: later calls raise at once (relaunch).

Not here: launching processes (`cqil.runtime.launch`), several ranks per process, recovery.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import numpy as np

from cqil.errors import CqilError, first_line
from cqil.program import rank_ordered_sum

_KEY = "cqil/"  # store keys of this module; torch.distributed's own live under "default_pg"


class PeerFailed(CqilError):
    """A collective failed because another rank stopped: this rank is a victim (exit status 1, not 2)."""

    exit_code = 1


class DistCollectives:
    """Collectives for rank `rank` of `world_size` processes.

    - `init_method`: torch.distributed's rendezvous URL: "env://" (torchrun; MASTER_ADDR/PORT)
      or "tcp://host:port"
    - `timeout`: seconds for the rendezvous and for every collective (default 600)
    - `device`: "cpu" (gloo, default) or "cuda:N" (NCCL, bound to that device); numpy values are
      staged through it, torch tensors already on it are used in place
    - `heartbeat`: seconds between liveness records (only used with more than two ranks)
    - `watchdog`: our own deadline on every collective (default: with NCCL). NCCL enforces its
      timeout by aborting the process from its watchdog thread, so no exception would ever reach
      the diagnosis: cqil's watchdog fires first (NCCL's timeout is set a minute later), names the
      rank that stopped, and calls `on_hang(message)` (default: print it and exit with status 1)
    """

    def __init__(self, rank: int, world_size: int, init_method: str = "env://", timeout: float = 600.0,
                 device: str = "cpu", backend: str | None = None, heartbeat: float = 1.0,
                 watchdog: bool | None = None, on_hang=None):
        import torch
        import torch.distributed as dist

        if not 0 <= rank < world_size:
            raise CqilError(f"rank {rank} is outside [0, {world_size})")
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout)
        self.device = torch.device(device)
        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self.failed_ranks: list[int] = []  # filled when a collective fails
        self._seq = 0                       # collectives entered so far
        self._broken: str | None = None
        self._torch, self._dist = torch, dist
        # torch >= 2.13 renames all_gather_into_tensor (same semantics; the old name warns)
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.watchdog = self.backend == "nccl" if watchdog is None else watchdog
        self._on_hang = on_hang or _exit_with
        self._inflight: tuple[str, int, float] | None = None  # (what, seq, start) of the collective under way
        device_id = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            device_id = self.device
        td = timedelta(seconds=self.timeout)
        group_td = timedelta(seconds=self.timeout + (60 if self.watchdog else 0))
        try:
            self.store, _, _ = next(dist.rendezvous(init_method, rank=rank, world_size=world_size, timeout=td))
            dist.init_process_group(self.backend, store=self.store, rank=rank, world_size=world_size,
                                    timeout=group_td, device_id=device_id)
        except (RuntimeError, ValueError) as e:  # DistStoreError, DistNetworkError are RuntimeErrors
            raise CqilError(f"rank {rank}: rendezvous of {world_size} processes at {init_method} failed within "
                            f"{self.timeout:g} s ({_gloo_line(e)}); did every rank start, with the same "
                            f"master address and port?") from e
        self._interval = max(0.05, min(heartbeat, self.timeout / 10))
        self._stop = threading.Event()
        self._beat_thread = None
        if world_size > 2 or self.watchdog:
            self._beat_thread = threading.Thread(target=self._beat, name=f"cqil-heartbeat-{rank}", daemon=True)
            self._beat_thread.start()

    # -- the collectives (the interface of LocalCollectives) ----------------------------------

    def __call__(self, rank: int, kind: str, value):
        if rank != self.rank:
            raise CqilError(f"collective for rank {rank} called in the process of rank {self.rank}")
        if self.world_size == 1:
            return [value] if kind == "all_gather" else value
        if kind == "all_reduce":
            # Not dist.all_reduce: its summation order depends on the backend's algorithm (ring,
            # halving-doubling, ...), so results would drift from the single-graph reference in the
            # last bits and greedy tokens could flip. The deltas are small ([B, T, H] per group),
            # so gathering them and adding in rank order costs little and is bit-identical.
            return rank_ordered_sum(self._gather(kind, value))
        if kind == "all_gather":
            return list(self._gather(kind, value))
        if kind == "broadcast":
            return self._broadcast(kind, value)
        raise CqilError(f"unknown collective {kind!r}")

    def share_tokens(self, tokens, batch: int):
        """Rank 0's chosen tokens int64 [batch] (others pass None), for every rank."""
        if self.world_size == 1:
            return tokens
        if self.rank == 0:
            tokens = np.ascontiguousarray(tokens, dtype=np.int64)
            if tokens.shape != (batch,):
                raise CqilError(f"share_tokens: rank 0 chose tokens of shape {tokens.shape}, expected ({batch},)")
        else:
            tokens = np.empty(batch, np.int64)
        return self._broadcast("share_tokens", tokens)

    def abort(self, failed_rank: int | None = None):
        """Nothing to wake up: this process holds one rank, which is the one that failed."""

    def reset(self):
        """A failed process group cannot be reused; later collectives raise (see `_guard`)."""

    def close(self):
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=2 * self._interval + 1)
        if self._broken is not None:
            if self.rank == 0 and self.world_size > 2:
                # without torchrun's agent, rank 0 hosts the store: stay up while the other
                # survivors read the heartbeats, so they can name the rank that stopped
                time.sleep(3 * self._interval)
            return  # tearing down could wait on the dead peer: leave it to process exit
        if self._dist.is_initialized():
            self._dist.destroy_process_group()

    # -- transport ----------------------------------------------------------------------------

    def _gather(self, what: str, value):
        """Every rank's `value`, stacked in rank order: [world_size, *value.shape]; torch tensors
        on this process's device stay there, anything else comes back as numpy."""
        torch = self._torch
        on_device = isinstance(value, torch.Tensor) and value.device == self.device and self.device.type != "cpu"
        send = value.contiguous() if on_device else torch.from_numpy(np.ascontiguousarray(value))
        shape = (self.world_size, *send.shape)
        if self.device.type == "cpu":
            out = np.empty(shape, send.numpy().dtype)
            with self._guard(what):
                self._all_gather(torch.from_numpy(out.reshape(-1)), send.reshape(-1))
            return out
        recv = torch.empty(send.numel() * self.world_size, dtype=send.dtype, device=self.device)
        with self._guard(what):
            self._all_gather(recv, send.reshape(-1).to(self.device))
        recv = recv.reshape(shape)
        return recv if on_device else recv.cpu().numpy()

    def _broadcast(self, what: str, buffer):
        if buffer is None:
            raise CqilError(f"rank {self.rank}: {what} needs a receive buffer (the engine sizes it from the manifest)")
        torch = self._torch
        if isinstance(buffer, torch.Tensor) and buffer.device == self.device and self.device.type != "cpu":
            buffer = buffer.contiguous()
            with self._guard(what):
                self._dist.broadcast(buffer, src=0)
            return buffer
        buffer = np.ascontiguousarray(buffer)
        tensor = torch.from_numpy(buffer)
        with self._guard(what):
            if self.device.type == "cpu":
                self._dist.broadcast(tensor, src=0)
                return buffer
            tensor = tensor.to(self.device)
            self._dist.broadcast(tensor, src=0)
            return tensor.cpu().numpy()

    @contextmanager
    def _guard(self, what: str):
        if self._broken is not None:
            raise PeerFailed(f"rank {self.rank}: {what} refused: an earlier collective failed ({self._broken}); "
                             f"relaunch all ranks")
        self._seq += 1
        self._inflight = (what, self._seq, time.monotonic())
        try:
            yield
        except RuntimeError as e:  # gloo / NCCL errors, DistBackendError included
            self.failed_ranks, how = self._suspects()
            self._broken = f"rank {self.rank}: {what} (collective #{self._seq}) failed: {how} [{_gloo_line(e)}]"
            raise PeerFailed(self._broken) from e
        finally:
            self._inflight = None

    # -- liveness -----------------------------------------------------------------------------

    def _beat(self):
        beats = 0
        while True:
            if self.world_size > 2:
                try:
                    self.store.set(f"{_KEY}alive/{self.rank}", f"{beats} {self._seq}")
                except Exception:  # the store's host is gone: nothing left to report to
                    return
            beats += 1
            inflight = self._inflight
            if self.watchdog and inflight and time.monotonic() - inflight[2] > self.timeout:
                what, seq, _ = inflight
                self.failed_ranks, how = self._suspects()
                self._broken = f"rank {self.rank}: {what} (collective #{seq}) failed: {how} [no answer within " \
                               f"{self.timeout:g} s]"
                self._on_hang(self._broken)
                return
            if self._stop.wait(self._interval):
                return

    def _read_alive(self, ranks) -> dict[int, tuple[int, int]]:
        keys = {q: f"{_KEY}alive/{q}" for q in ranks}
        return {q: tuple(int(x) for x in self.store.get(k).decode().split()) for q, k in keys.items()
                if self.store.check([k])}

    def _suspects(self) -> tuple[list[int], str]:
        others = [q for q in range(self.world_size) if q != self.rank]
        if len(others) == 1:
            return others, f"rank {others[0]} stopped (exited, was killed, or hangs)"
        wait = 2.5 * self._interval
        try:
            self.store.set(f"{_KEY}victim/{self.rank}", str(self._seq))
            before = self._read_alive(others)
            time.sleep(wait)
            after = self._read_alive(others)
            victims = {q for q in others if self.store.check([f"{_KEY}victim/{q}"])}
        except Exception:
            return [0] if self.rank else others, (
                "the rendezvous store stopped answering (its host, rank 0 or torchrun's agent, is gone)")
        dead = [q for q in others if q not in victims and (q not in after or after[q][0] == before.get(q, (None,))[0])]
        stuck = [q for q in others if q not in victims and q not in dead and after[q][1] < self._seq]
        if dead or stuck:
            parts = ([f"rank(s) {_names(dead)} stopped (no heartbeat for {wait:.1f} s)"] if dead else []) + \
                    ([f"rank(s) {_names(stuck)} hang before this collective"] if stuck else [])
            return sorted(dead + stuck), "; ".join(parts)
        return others, (f"could not tell which of rank(s) {_names(others)} stopped (all still beating, none behind);"
                        f" suspect them all")


def _names(ranks) -> str:
    return ", ".join(str(r) for r in ranks)


def _exit_with(message: str):
    """The watchdog's default: the one line, then exit at once (teardown would wait on the hung peer)."""
    import os
    import sys

    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def _gloo_line(e: BaseException) -> str:
    """first_line without gloo's "[/path/to/pair.cc:537] " prefix and its generic advice."""
    text = first_line(e)
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically caused", 1)[0].rstrip(".")
