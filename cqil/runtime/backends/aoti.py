"""The AOTInductor backend: run each segment's package (`rank{r}/seg{i}.pt2`) with torch.

    engine = cqil.load("engine_dir", backend="aoti")        # needs cqil-compile --formats onnx,aoti

Options: `devices` (default: the device the packages were compiled for; see `parse_devices`).

These are the files the C++ runtime (`cqil/native`, docs/cpp.md) runs, so the Python and C++
runtimes can be compared on identical packages. Opening refuses, one line each: an engine without
packages, packages built by another torch major.minor (the package and the loader share the
`aoti_torch_*` C shim), packages built for a CPU instruction set this CPU lacks, and a device of the
other kind than the packages were compiled for.

KV cache (`PackageCache`, one per Generator): the packages' buffer form (cqil.exporters.aoti), a
`cqil.runtime.kv_cache.BufferCache`. Per layer a key and a value buffer [B, kv_heads, capacity,
head_dim] that the packages write in place; no `present` outputs, no copy per step. Capacity keeps
one spare slot beyond the longest sequence (the packages need S < capacity) and grows in powers of
two from 64 up to max_seq_len + 1, keeping the contents, so a generation reallocates at most a few
times and never copies per step.

Threads: a package's kernels use the calling thread's intra-op count (OpenMP); each call sets the
count the Engine assigns its segment and restores the thread's own afterwards.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import torch

from cqil.errors import CqilError, first_line
from cqil.runtime.backends.device import DeviceRank, parse_devices
from cqil.runtime.kv_cache import BufferCache

OPTIONS = frozenset({"devices"})
MIN_CAPACITY = 64
_ISA_FLAGS = {  # AOTI_CPU_ISA words (inductor's vector ISA, upper-cased) -> /proc/cpuinfo flags they need
    "AVX2": ("avx2", "fma", "f16c"),
    "AVX512": ("avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"),
    "AVX512_VNNI": ("avx512_vnni",),
    "AMX_TILE": ("amx_tile",),
}


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def missing_cpu_feature(isa: str) -> str | None:
    """The first CPU feature that code built for `isa` needs and this CPU lacks (None: it runs here)."""
    flags = _cpu_flags()
    if not flags:  # no /proc/cpuinfo: nothing to check against
        return None
    for word in isa.upper().split():
        for flag in _ISA_FLAGS.get(word, ()):  # other architectures' ISAs run where they were built
            if flag not in flags:
                return flag
    return None


def check_packages(spec) -> dict:
    """The engine's AOTInductor record, if this torch and CPU can run its packages (else one line)."""
    record = spec.manifest.get("aoti")
    if record is None:
        raise CqilError(f"engine: {spec.dir} has no AOTInductor packages: recompile it with --formats onnx,aoti")
    built, ours = record["torch"], torch.__version__
    if re.match(r"\d+\.\d+", built).group() != re.match(r"\d+\.\d+", ours).group():
        raise CqilError(f"engine: {spec.dir} holds AOTInductor packages built by torch {built}, this is torch {ours}: "
                        f"recompile the engine with this torch")
    missing = missing_cpu_feature(record["isa"]) if record["device"] == "cpu" else None
    if missing:
        raise CqilError(f"engine: {spec.dir} holds packages compiled for CPUs with {record['isa']}, and this CPU lacks "
                        f"{missing}: recompile the engine on this machine")
    return record


class PackageCache(BufferCache):
    """One Generator's KV buffers on one rank: a BufferCache with the packages' spare slot and limits,
    worked on the rank's device and stream (see the module docstring)."""

    def __init__(self, rank: "AotiRank", batch: int):
        super().__init__(rank.kv_layers, batch, rank.zeros, rank.max_seq_len, spare=1, min_capacity=MIN_CAPACITY)
        self.rank = rank

    def begin(self, env: dict) -> None:
        r = self.rank
        B, total = env["input_ids"].shape[0], env["attention_mask"].shape[1]
        if total > r.max_seq_len:
            raise CqilError(f"rank {r.rank}: {total} tokens exceed the engine's max_seq_len {r.max_seq_len}")
        if B > r.max_batch:
            raise CqilError(f"rank {r.rank}: a batch of {B} rows, but the packages take at most {r.max_batch} "
                            f"(cqil-compile --max-batch)")
        with r.on_stream():
            super().begin(env)

    def drop_front(self, n: int) -> None:
        with self.rank.on_stream():
            super().drop_front(n)

    def select(self, rows: Sequence[int]) -> None:
        with self.rank.on_stream():
            super().select(rows)

    def merge(self, other: "PackageCache") -> None:
        with self.rank.on_stream():
            super().merge(other)


class AotiSegment:
    def __init__(self, rank: "AotiRank", package, rec: dict, threads: int):
        self.rank, self.package, self.threads = rank, package, threads
        self.file = rec["aoti"]["file"]
        self.inputs = [t["name"] for t in rec["aoti"]["inputs"]]
        self.outputs = [t["name"] for t in rec["aoti"]["outputs"]]
        self.dtypes = {t["name"]: getattr(torch, t["dtype"]) for t in rec["aoti"]["inputs"]}
        self.weight_bytes = rec.get("weight_bytes", 0)

    def __call__(self, env: dict) -> None:
        r = self.rank
        own = torch.get_num_threads()
        with r.on_stream():
            args = [r.tensor(env, n, self.dtypes[n]) for n in self.inputs]
            if own != self.threads:
                torch.set_num_threads(self.threads)
            try:
                outs = self.package(*args)
            except Exception as e:
                raise CqilError(f"engine: {self.file} failed: {first_line(e)}") from None
            finally:
                if own != self.threads:
                    torch.set_num_threads(own)
            for name, value in zip(self.outputs, outs):
                env[name] = r.publish(name, value)


class AotiRank(DeviceRank):
    """A rank's packages, loaded on its device."""

    def __init__(self, spec, rank: int, device: torch.device, threads, record: dict):
        from cqil.model.loader import parse_dtype

        super().__init__(rank, device, parse_dtype(spec.dtype))
        self.max_seq_len, self.max_batch = spec.max_seq_len, record["dims"]["batch"][1]
        self.kv_layers = spec.kv_layers(rank)
        self.kv_shape = (spec.config.num_kv_heads, spec.config.head_dim)
        self.segments = {}
        for rec in spec.segments(rank):
            if "aoti" not in rec:
                raise CqilError(f"engine: rank {rank} {rec['name']} has no package: recompile with --formats onnx,aoti")
            path = spec.dir / rec["aoti"]["file"]
            try:
                # one thread at a time calls a rank's packages (the Engine serialises its steps)
                package = torch._inductor.aoti_load_package(
                    str(path), run_single_threaded=True, device_index=device.index if device.type == "cuda" else -1)
            except Exception as e:
                raise CqilError(f"engine: cannot load {rec['aoti']['file']}: {first_line(e)}") from None
            self.segments[rec["name"]] = AotiSegment(self, package, rec, threads(rec))

    def zeros(self, batch: int, capacity: int) -> torch.Tensor:
        """One zeroed KV buffer [batch, kv_heads, capacity, head_dim] on this rank."""
        heads, dim = self.kv_shape
        return torch.zeros((batch, heads, capacity, dim), dtype=self.dtype, device=self.device)

    def new_cache(self, batch: int) -> PackageCache:
        return PackageCache(self, batch)

    def close(self):
        self.segments = {}  # each package's temporary folder goes with its loader


def open_rank(spec, rank: int, threads, ranks_in_process: int, devices=None) -> AotiRank:
    record = check_packages(spec)
    wanted = devices or record["device"]
    device = parse_devices(wanted, spec.ranks)[rank]
    if device.type != record["device"]:
        other = "cuda" if device.type == "cuda" else "cpu"
        raise CqilError(f"devices: rank {rank} asks for {device}, but the engine's packages were compiled for "
                        f"{record['device']} (cqil-compile --devices {other} builds the other kind)")
    return AotiRank(spec, rank, device, threads, record)


def local_collectives(runners, timeout):
    from cqil.runtime.collectives import LocalCollectives

    ranks = list(runners.values())
    if all(r.stream is None for r in ranks):
        return LocalCollectives(len(ranks), timeout=timeout)
    from cqil.runtime.backends.device_collectives import DeviceCollectives

    return DeviceCollectives([r.device for r in ranks], [r.stream for r in ranks], timeout)

