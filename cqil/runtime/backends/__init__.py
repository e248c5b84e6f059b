"""Segment backends: how one exported segment is opened and run.

A backend is a function `open_segment(engine, rank, record, **options) -> callable(env)`; the
callable reads its inputs from the rank's environment dict and writes its outputs into it, and has
`inputs`, `outputs` and `weight_bytes` attributes. `get(name)` returns one by name;
`collectives(name, engine, timeout)` the in-process collectives that suit its values (numpy
arrays for onnxruntime; torch tensors, possibly on several CUDA devices, for torch and tensorrt).
"""

from __future__ import annotations

from cqil.errors import CqilError
from cqil.runtime.collectives import LocalCollectives

NAMES = ("onnxruntime", "torch", "tensorrt")


def get(name: str):
    if name == "onnxruntime":
        from cqil.runtime.backends.onnxruntime import open_segment
        return open_segment
    if name == "torch":
        from cqil.runtime.backends.torch_backend import open_segment
        return open_segment
    if name == "tensorrt":
        from cqil.runtime.backends.tensorrt import open_segment
        return open_segment
    raise CqilError(f"unknown runtime backend {name!r} (available: {', '.join(NAMES)})")


def collectives(name: str, engine, timeout: float | None):
    """In-process collectives between `engine`'s rank threads, for the values of backend `name`."""
    if name in ("torch", "tensorrt"):
        from cqil.runtime.backends.device_collectives import DeviceCollectives
        return DeviceCollectives.for_engine(engine, timeout)
    return LocalCollectives(len(engine.ranks), timeout=timeout)
