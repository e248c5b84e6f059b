"""Export each rank's weights to `rank{r}/weights.safetensors`, for the torch and TensorRT-free GPU path.

The file holds exactly the parameters that the rank's segments use, under their HuggingFace names;
a tied lm_head is stored once, as `model.embed_tokens.weight` (as HF checkpoints do). The runtime
(`cqil.runtime.backends.torch_backend`) rebuilds the segments from the manifest and loads this file
onto the rank's device.

The file is written in the safetensors layout directly, one tensor at a time (8-byte header size,
JSON header, raw little-endian data), so that exporting a 70B rank holds one tensor in memory, not
the rank's whole share: `safetensors.torch.save_file` would need every tensor at once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from cqil.errors import CqilError
from cqil.model.loader import param_names, stored_name
from cqil.passes.partition import Partition, Segment

WEIGHTS_FILE = "weights.safetensors"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def rank_parameters(segments: list[Segment], tied: bool) -> dict[str, tuple[Segment, str]]:
    """Stored name -> (a segment that uses it, its name there), in first-use order."""
    params: dict[str, tuple[Segment, str]] = {}
    for seg in segments:
        for name in param_names(seg.gm):
            params.setdefault(stored_name(name, tied), (seg, name))
    return params


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write tensors (given in the order of `specs`) to a safetensors file; returns its size."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        if dtype not in _DTYPES:
            raise CqilError(f"export: {name} has dtype {dtype}, which safetensors cannot hold here")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        it = iter(tensors)
        for name, dtype, shape in specs:
            t = next(it).detach()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CqilError(f"export: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
            data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data.data)
            written += data.nbytes
        if hasattr(it, "close"):
            it.close()  # a generator's cleanup (releasing the last tensor) runs now, not at collection
    return 8 + len(raw) + written


def export_torch_weights(part: Partition, out_dir: Path, tied: bool, materialize: Callable[[list[str]], None],
                         release: Callable[[list[str]], None]) -> dict[int, dict]:
    """Write rank{r}/weights.safetensors for every rank; returns each rank's manifest "weights" record.

    `materialize(names)` / `release(names)` load and drop checkpoint tensors by name (one at a time
    here), as `cqil.model.loader.Weights` does.
    """
    records = {}
    for rank, segments in part.segments.items():
        params = rank_parameters(segments, tied)
        specs = []
        for stored, (seg, name) in params.items():
            p = seg.gm.get_parameter(name)
            specs.append((stored, p.dtype, tuple(p.shape)))

        def tensors():
            for stored, (seg, name) in params.items():
                materialize([stored])
                try:
                    t = seg.gm.get_parameter(name)
                    if t.is_meta:
                        raise CqilError(f"export: rank {rank} parameter {name} is still on the meta device")
                    yield t
                finally:
                    release([stored])

        folder = out_dir / f"rank{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        size = write_safetensors(folder / WEIGHTS_FILE, specs, tensors(), {"format": "pt", "rank": str(rank)})
        records[rank] = {"file": f"rank{rank}/{WEIGHTS_FILE}", "format": "safetensors",
                         "tensors": len(specs), "bytes": size}
    return records
