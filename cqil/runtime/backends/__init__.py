"""Segment backends: how one rank's exported segments are opened and run.

A backend is a module named in `BACKENDS` that defines

    OPTIONS                        the keyword options it takes (a frozenset of names)
    open_rank(spec, rank, threads, ranks_in_process, **options) -> RankRunner
    local_collectives(runners, timeout)
                                   collectives between the rank threads of one process, for the
                                   values this backend's segments produce

`spec` is the engine's `EngineSpec`; `threads(segment_record)` is the intra-op thread count the
Engine gives that segment; `ranks_in_process` is how many ranks share this process. A RankRunner
owns everything of its rank (sessions, device, stream, weights) and nothing of another's:

    runner.rank, runner.segments      {name: callable(env)} with inputs, outputs, weight_bytes
    runner.new_cache(batch)           a fresh KV cache of the rank (see cqil.runtime.kv_cache)
    runner.empty(shape, dtype)        an uninitialised value of the rank's kind (numpy, device tensor)
    runner.close()                    release sessions, weights and device memory now

Adding a backend is one module and one line in BACKENDS. An option the chosen backend does not
take is an error, not ignored.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

from cqil.errors import CqilError
from cqil.runtime.kv_cache import KVCache

BACKENDS = {
    "onnxruntime": "cqil.runtime.backends.onnxruntime",
    "torch": "cqil.runtime.backends.torch_backend",
    "tensorrt": "cqil.runtime.backends.tensorrt",
    "aoti": "cqil.runtime.backends.aoti",
}


class SegmentRunner(Protocol):
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int

    def __call__(self, env: dict) -> None:
        """Read the inputs from `env`, write the outputs into it."""


class RankRunner(Protocol):
    rank: int
    segments: dict[str, SegmentRunner]

    def new_cache(self, batch: int) -> KVCache: ...

    def empty(self, shape, dtype: str): ...

    def close(self) -> None: ...


def backend(name: str):
    """The backend module called `name`."""
    if name not in BACKENDS:
        raise CqilError(f"unknown runtime backend {name!r} (available: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name])


def check_options(name: str, options: dict):
    """Refuse options backend `name` does not take, naming the ones it does."""
    allowed = backend(name).OPTIONS
    unknown = sorted(set(options) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no options"
        raise CqilError(f"backend {name} does not take option(s) {', '.join(unknown)} (it takes: {takes})")


def open_ranks(name: str, spec, ranks: list[int], threads: Callable[[int, dict], int],
               options: dict) -> dict[int, RankRunner]:
    """Open `ranks` of the engine with backend `name`; `threads(rank, segment_record)` sizes thread pools."""
    check_options(name, options)
    module = backend(name)
    runners: dict[int, RankRunner] = {}
    try:
        for r in ranks:
            runners[r] = module.open_rank(spec, r, threads=lambda rec, r=r: threads(r, rec),
                                          ranks_in_process=len(ranks), **options)
    except BaseException:
        for runner in runners.values():
            runner.close()
        raise
    return runners


def local_collectives(name: str, runners: dict[int, RankRunner], timeout: float | None):
    return backend(name).local_collectives(runners, timeout)


def add_backend_flags(parser):
    """--backend and --devices, as every command that runs an engine takes them."""
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="onnxruntime",
                        help="how segments run (default onnxruntime; torch needs --formats onnx,torch at compile "
                             "time, tensorrt --backend tensorrt)")
    parser.add_argument("--devices", help="cpu, cuda (rank r on GPU r mod count: fewer GPUs than ranks share), or "
                                          "one per rank: cuda:0,cuda:1 (default: cpu; the torch backend: cuda if "
                                          "there is one)")


def backend_options(args) -> dict:
    """Engine keywords from --backend / --devices."""
    return {"backend": args.backend, **({"devices": args.devices} if args.devices else {})}
