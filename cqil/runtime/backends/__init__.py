"""Segment backends: how one exported segment is opened and run.

A backend is a function `open_segment(engine, rank, record, **options) -> callable(env)`; the
callable reads its inputs from the rank's environment dict and writes its outputs into it, and has
`inputs`, `outputs` and `weight_bytes` attributes. `get(name)` returns one by name.
"""

from __future__ import annotations

from cqil.errors import CqilError


def get(name: str):
    if name == "onnxruntime":
        from cqil.runtime.backends.onnxruntime import open_segment
        return open_segment
    raise CqilError(f"unknown runtime backend {name!r} (available: onnxruntime)")
