"""The manifest's schema: every field a reader relies on, checked, each failure naming the field.

A hand-edited, truncated or foreign manifest fails here with one line such as
`engine: E/manifest.json: ranks[1].segments[0].inputs[2].shape[1] must be an int >= 0 or one of
batch, sequence, past_sequence, total_sequence, got 'x'` instead of deep inside a backend or, under
torchrun, inside gloo. Beyond types it checks what ranks must agree on: one record per rank of the
plan, programs naming their own segments, the same collectives in the same order on every rank,
and the same shape for what each rank sends to a collective. File paths must stay inside the
engine directory.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.plan import Plan
from cqil.program import AXES, STEP_KINDS

DTYPES = ("float32", "float16", "bfloat16")
TENSOR_DTYPES = (*DTYPES, "int64", "bool")
AOTI_DEVICES = ("cpu", "cuda")
KV_CAPACITY = "kv_capacity"  # the KV buffers' position axis in AOTInductor packages (cqil.exporters.aoti)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Checker:
    def __init__(self, path):
        self.path = path

    def fail(self, where: str, what: str):
        raise CqilError(f"engine: {self.path}: {where} {what}")

    def get(self, obj: dict, key: str, kind, where: str, optional: bool = False):
        if not isinstance(obj, dict) or key not in obj:
            if optional:
                return None
            self.fail(f"{where}{key}", "is missing")
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(f"{where}{key}", f"must be a {name}, got {value!r}")
        return value

    def count(self, obj: dict, key: str, where: str, low: int = 0, optional: bool = False):
        value = self.get(obj, key, int, where, optional)
        if value is not None and value < low:
            self.fail(f"{where}{key}", f"must be >= {low}, got {value}")
        return value

    def strings(self, obj: dict, key: str, where: str, optional: bool = False) -> list[str]:
        values = self.get(obj, key, list, where, optional) or []
        for i, v in enumerate(values):
            if not isinstance(v, str):
                self.fail(f"{where}{key}[{i}]", f"must be a string, got {v!r}")
        return values

    def relpath(self, value: str, where: str):
        p = PurePosixPath(value)
        if not value or p.is_absolute() or ".." in p.parts or "\\" in value:
            self.fail(where, f"must be a path inside the engine directory, got {value!r}")

    def tensor(self, rec, where: str, axes=AXES) -> tuple:
        self.get(rec, "name", str, where + ".")
        dtype = self.get(rec, "dtype", str, where + ".")
        if dtype not in TENSOR_DTYPES:
            self.fail(f"{where}.dtype", f"must be one of {', '.join(TENSOR_DTYPES)}, got {dtype!r}")
        shape = self.get(rec, "shape", list, where + ".")
        for i, d in enumerate(shape):
            if not ((isinstance(d, int) and not isinstance(d, bool) and d >= 0) or d in axes):
                self.fail(f"{where}.shape[{i}]", f"must be an int >= 0 or one of {', '.join(axes)}, got {d!r}")
        return dtype, tuple(shape)


def check_manifest(manifest: dict, path) -> None:
    c = _Checker(path)
    version = c.get(manifest, "format_version", int, "")
    if version < 1:
        c.fail("format_version", f"must be >= 1, got {version}")
    try:
        config = ModelConfig.from_dict(c.get(manifest, "model", dict, ""))
        plan = Plan.from_dict(c.get(manifest, "plan", dict, ""))
    except (CqilError, TypeError) as e:
        raise CqilError(f"engine: {path}: {e}") from None
    if plan.num_layers != config.num_layers:
        c.fail("plan.num_layers", f"is {plan.num_layers}, the model has {config.num_layers} layers")
    dtype = c.get(manifest, "dtype", str, "")
    if dtype not in DTYPES:
        c.fail("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    c.count(manifest, "max_seq_len", "", low=1)
    c.get(manifest, "fused", bool, "", optional=True)
    quant = c.get(manifest, "quantization", (dict, type(None)), "", optional=True)
    if quant:
        if quant.get("kind") not in ("int4", "int8"):
            c.fail("quantization.kind", f"must be int4 or int8, got {quant.get('kind')!r}")
        c.count(quant, "block", "quantization.", low=16)
    if manifest.get("max_segment_bytes") is not None:
        c.count(manifest, "max_segment_bytes", "", low=1)
    for i, f in enumerate(c.strings(manifest, "tokenizer_files", "", optional=True)):
        c.relpath(f, f"tokenizer_files[{i}]")
    for rel, rec in c.get(manifest, "files", dict, "").items():
        where = f"files[{rel!r}]"
        c.relpath(rel, where)
        if not _SHA256.match(c.get(rec, "sha256", str, where + ".")):
            c.fail(where + ".sha256", "must be 64 hexadecimal digits")
        c.count(rec, "bytes", where + ".")

    if manifest.get("aoti") is not None:
        _check_aoti(c, c.get(manifest, "aoti", dict, ""))
    ranks = c.get(manifest, "ranks", list, "")
    numbers = [c.get(r, "rank", int, f"ranks[{i}].") for i, r in enumerate(ranks)]
    if sorted(numbers) != list(range(plan.p)):
        c.fail("ranks", f"hold ranks {sorted(numbers)}, the plan has p={plan.p} (ranks 0..{plan.p - 1})")
    collectives, sent = {}, {}
    for i, rank in enumerate(ranks):
        r, where = rank["rank"], f"ranks[{i}]."
        for j, layer in enumerate(c.get(rank, "kv_layers", list, where)):
            if not (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < config.num_layers):
                c.fail(f"{where}kv_layers[{j}]", f"must be a layer in 0..{config.num_layers - 1}, got {layer!r}")
        tensors = {}
        names = set()
        for j, seg in enumerate(c.get(rank, "segments", list, where)):
            w = f"{where}segments[{j}]."
            names.add(c.get(seg, "name", str, w))
            files = c.strings(seg, "files", w)
            if not files:
                c.fail(w + "files", "names no file")
            for k, f in enumerate(files):
                c.relpath(f, f"{w}files[{k}]")
            for key in ("inputs", "outputs"):
                for k, t in enumerate(c.get(seg, key, list, w)):
                    tensors.setdefault(t["name"] if isinstance(t, dict) else None, c.tensor(t, f"{w}{key}[{k}]"))
            c.count(seg, "weight_bytes", w, optional=True)
            if seg.get("tensorrt_engine") is not None:
                c.relpath(c.get(seg, "tensorrt_engine", str, w), w + "tensorrt_engine")
            if manifest.get("aoti") is not None:
                _check_package(c, c.get(seg, "aoti", dict, w), w + "aoti", manifest["files"])
        order = []
        for j, step in enumerate(c.get(rank, "program", list, where)):
            w = f"{where}program[{j}]."
            kind = c.get(step, "kind", str, w)
            if kind not in STEP_KINDS:
                c.fail(w + "kind", f"must be one of {', '.join(STEP_KINDS)}, got {kind!r}")
            if kind == "segment":
                if c.get(step, "segment", str, w) not in names:
                    c.fail(w + "segment", f"names {step['segment']!r}, which rank {r} does not have")
                continue
            inputs, outputs = c.strings(step, "inputs", w), c.strings(step, "outputs", w)
            if len(inputs) != 1 or not outputs:
                c.fail(w[:-1], "must send one tensor (inputs) and receive at least one (outputs)")
            order.append((kind, step.get("group")))
            shown = inputs[0] if kind != "broadcast" or r == 0 else outputs[0]
            sent.setdefault(len(order) - 1, {})[r] = tensors.get(shown)
        collectives[r] = order
    first = collectives[0]
    for r, order in collectives.items():
        if order != first:
            c.fail(f"ranks (rank {r})", f"run the collectives {order}, rank 0 runs {first}; ranks must agree")
    for index, by_rank in sent.items():
        specs = {spec for spec in by_rank.values() if spec is not None}
        if len(specs) > 1:
            c.fail(f"collective #{index + 1} ({first[index][0]})", f"gets tensors of different dtype/shape from "
                   f"the ranks: {dict(sorted(by_rank.items()))}")


AOTI_DIMS = ("batch", "sequence", "total_sequence", KV_CAPACITY)


def _check_aoti(c: _Checker, aoti: dict):
    """The engine's AOTInductor record (cqil.exporters.aoti): what the packages were built for."""
    device = c.get(aoti, "device", str, "aoti.")
    if device not in AOTI_DEVICES:
        c.fail("aoti.device", f"must be one of {', '.join(AOTI_DEVICES)}, got {device!r}")
    if not re.match(r"^\d+\.\d+", c.get(aoti, "torch", str, "aoti.")):
        c.fail("aoti.torch", f"must be a torch version such as 2.13.0, got {aoti['torch']!r}")
    c.get(aoti, "isa", str, "aoti.")
    if c.get(aoti, "kv_layout", str, "aoti.") != "buffer":
        c.fail("aoti.kv_layout", f"must be 'buffer', got {aoti['kv_layout']!r}")
    dims = c.get(aoti, "dims", dict, "aoti.")
    for name in AOTI_DIMS:
        bounds = c.get(dims, name, list, "aoti.dims.")
        if not (len(bounds) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                and 1 <= bounds[0] <= bounds[1]):
            c.fail(f"aoti.dims.{name}", f"must be [min, max] with 1 <= min <= max, got {bounds!r}")


def _check_package(c: _Checker, rec: dict, where: str, files: dict):
    """One segment's package record: its file (inside the engine, with a checksum) and its tensors."""
    path = c.get(rec, "file", str, where + ".")
    c.relpath(path, where + ".file")
    if path not in files:
        c.fail(where + ".file", f"{path} has no checksum in the manifest's files (hand-edited manifest?)")
    for key in ("inputs", "outputs"):
        for k, t in enumerate(c.get(rec, key, list, where + ".")):
            c.tensor(t, f"{where}.{key}[{k}]", axes=AOTI_DIMS)
