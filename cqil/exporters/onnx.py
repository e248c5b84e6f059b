"""Export the segments of a partition to ONNX files.

Shapes come from running the programs on the meta device twice, with two different
(batch, sequence, past) sizes: an axis whose size changes is dynamic, and is named by what it
matched ("batch", "sequence", "past_sequence", "total_sequence"). Weights are materialized one
segment at a time (`materialize` / `release`), so a compile never holds more than one segment's
weights; the partition's `max_segment_bytes` bounds those. The legacy TorchScript exporter (`dynamo=False`) is used: it handles the empty
past_sequence of a prefill and is far faster to run than the dynamo exporter.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.passes.partition import Partition, Segment
from cqil.program import AXES, cache_entries, past_name, run_lockstep

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1 << 30  # keep protobufs far from their 2 GiB limit
_SIZES = ((2, 3, 5), (3, 7, 4))  # (batch, sequence, past): distinct in every way that matters


def _feeds(cfg: ModelConfig, dtype, batch, seq, past, device="meta") -> dict:
    feeds = {
        "input_ids": torch.zeros(batch, seq, dtype=torch.int64, device=device),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64, device=device),
        "position_ids": torch.arange(past, past + seq, device=device).expand(batch, seq).contiguous()
        if device != "meta" else torch.zeros(batch, seq, dtype=torch.int64, device=device),
    }
    for layer, kind in cache_entries(range(cfg.num_layers)):
        feeds[past_name(layer, kind)] = torch.zeros(batch, cfg.num_kv_heads, past, cfg.head_dim, dtype=dtype,
                                                    device=device)
    return feeds


def _run_meta(part: Partition, cfg: ModelConfig, dtype, sizes) -> dict[int, dict]:
    segs = {r: {s.name: s for s in segments} for r, segments in part.segments.items()}

    def run(rank, name, env):
        seg = segs[rank][name]
        with torch.no_grad():
            return dict(zip(seg.outputs, seg.gm(*[env[n] for n in seg.inputs])))

    envs = {r: _feeds(cfg, dtype, *sizes) for r in part.programs}
    return run_lockstep(part.programs, run, envs)


@contextlib.contextmanager
def _tensors_on_meta(part: Partition):
    """Real tensors (rope frequencies; all weights when an adapter was merged) cannot mix with meta
    inputs: swap every parameter and buffer for a meta copy during a meta run, then put them back."""
    saved = []
    for segments in part.segments.values():
        for seg in segments:
            for module in seg.gm.modules():
                for table in (module._parameters, module._buffers):
                    for name, t in table.items():
                        if t is not None and not t.is_meta:
                            saved.append((table, name, t))
                            meta = t.to("meta")
                            table[name] = torch.nn.Parameter(meta, requires_grad=False) if table is module._parameters else meta
    try:
        yield
    finally:
        for table, name, t in saved:
            table[name] = t


def value_specs(part: Partition, cfg: ModelConfig, dtype) -> dict[int, dict[str, dict]]:
    """Per rank: tensor name -> {dtype, shape with dynamic axes named}."""
    with _tensors_on_meta(part):
        runs = [_run_meta(part, cfg, dtype, sizes) for sizes in _SIZES]
    (b, t, p), _ = _SIZES
    axis_names = dict(zip((b, t, p, p + t), AXES))
    specs = {}
    for rank, env in runs[0].items():
        specs[rank] = {}
        for name, value in env.items():
            other = runs[1][rank][name]
            shape = []
            for axis, (a, c) in enumerate(zip(value.shape, other.shape)):
                if a == c:
                    shape.append(int(a))
                elif a in axis_names and (axis == 0) == (a == b):
                    shape.append(axis_names[a])
                else:
                    raise CqilError(f"export: cannot name dynamic axis {axis} of {name} ({a} vs {c})")
            specs[rank][name] = {"dtype": str(value.dtype).removeprefix("torch."), "shape": shape}
    return specs


def _example(spec: dict, name: str, cfg: ModelConfig) -> torch.Tensor:
    (b, t, p), _ = _SIZES
    sizes = dict(zip(AXES, (b, t, p, p + t)))
    shape = [sizes.get(d, d) for d in spec["shape"]]
    dtype = getattr(torch, spec["dtype"])
    if name == "input_ids":
        return torch.randint(0, cfg.vocab_size, shape)
    if name == "position_ids":
        return torch.arange(p, p + t).expand(*shape).contiguous()
    if name == "attention_mask":
        return torch.ones(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape).to(dtype)


def export_segment(seg: Segment, specs: dict[str, dict], path: Path, cfg: ModelConfig,
                   release: Callable[[], None] | None = None) -> dict:
    """Write one segment to `path` (+ `path.data` when large) and return its manifest record.

    `release` drops the segment's torch weights as soon as the exporter is done with them. Memory
    peaks inside `torch.onnx.export` at about 4x the segment's weights (the torch weights, the
    weights serialized for ONNX shape inference, the protobuf in C++ and as Python bytes); what
    follows holds at most the protobuf and the file's bytes, and a file small enough to keep its
    weights inside is moved into place as the exporter wrote it, without a second serialization.
    """
    import onnx

    example = tuple(_example(specs[n], n, cfg) for n in seg.inputs)
    dynamic = {n: {i: d for i, d in enumerate(specs[n]["shape"]) if isinstance(d, str)}
               for n in [*seg.inputs, *seg.outputs]}
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in seg.gm.parameters()}.values())
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        # the exporter may spill large tensors one file each next to its output: keep that apart
        raw = Path(tmp) / "segment.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(seg.gm, example, str(raw), input_names=list(seg.inputs),
                              output_names=list(seg.outputs), dynamic_axes=dynamic,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        if release is not None:
            release()
        model = onnx.load(str(raw), load_external_data=False)
        _check_interface(model, seg, path)
        data_name = path.name + ".data"
        spilled = len(list(Path(tmp).iterdir())) > 1  # above 2 GiB the exporter writes a file per tensor
        if weight_bytes > EXTERNAL_DATA_THRESHOLD or spilled:
            onnx.load_external_data_for_model(model, tmp)
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            os.replace(raw, path)
        del model
    onnx.checker.check_model(str(path))
    files = [path.name] + ([data_name] if (path.parent / data_name).exists() else [])
    return {
        "name": seg.name,
        "files": files,
        "inputs": [{"name": n, **specs[n]} for n in seg.inputs],
        "outputs": [{"name": n, **specs[n]} for n in seg.outputs],
        "layers": seg.layers,
        "weight_bytes": weight_bytes,
    }


def rewrite(model, path: Path):
    """Replace the segment file at `path` by `model` (a rewrite of it): its weights go where they
    were (inline, or `path.data` for a large segment), each file renamed into place."""
    import onnx

    data = path.with_name(path.name + ".data")
    tmp = path.with_name(path.name + ".rewriting")
    if data.exists():
        staged = data.with_name(data.name + ".rewriting")
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=staged.name, size_threshold=1024)
        os.replace(staged, data)
        saved = onnx.load(str(tmp), load_external_data=False)
        for t in saved.graph.initializer:  # point the references at the final name
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data.name
        onnx.save_model(saved, str(tmp))
    else:
        onnx.save_model(model, str(tmp))
    os.replace(tmp, path)


def _check_interface(model, seg: Segment, path: Path):
    """The exporter drops unused inputs; a segment's interface must stay exactly as planned."""
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != list(seg.inputs) or outputs != list(seg.outputs):
        raise CqilError(f"export: {path.name} came out with inputs {inputs} / outputs {outputs}, "
                        f"expected {seg.inputs} / {seg.outputs}")


def export_partition(part: Partition, cfg: ModelConfig, dtype, out_dir: Path,
                     materialize: Callable[[Segment], None], release: Callable[[Segment], None],
                     progress=None) -> dict[int, list[dict]]:
    """Export every segment of every rank into out_dir/rank{r}/; returns manifest records per rank."""
    specs = value_specs(part, cfg, dtype)
    records = {}
    for rank, segments in part.segments.items():
        folder = out_dir / f"rank{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        records[rank] = []
        for seg in segments:
            materialize(seg)
            try:
                rec = export_segment(seg, specs[rank], folder / f"{seg.name}.onnx", cfg, lambda: release(seg))
            finally:
                release(seg)  # again, in case the export failed before it released them
            rec["files"] = [f"rank{rank}/{f}" for f in rec["files"]]
            records[rank].append(rec)
            if progress is not None:
                progress.update(1)
    return records
