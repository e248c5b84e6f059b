"""Export the segments of a partition as AOTInductor packages: `rank{r}/seg{i}.pt2`, in buffer form.

A package is a segment compiled ahead of time by `torch.export` + `aoti_compile_and_package`: a
shared library (kernels, C++ wrapper, weights) that `torch._inductor.aoti_load_package` runs from
Python and `torch::inductor::AOTIModelPackageLoader` from C++ (`cqil/native`).

**Buffer form.** The ONNX segment concatenates its past with the step's keys/values into a new
`present` (a whole-cache copy every step). A package instead takes every
`past_key_values.{l}.key|value` as the rank's preallocated buffer [batch, kv_heads, kv_capacity,
head_dim] and writes the step's T new rows in place at positions S-T..S-1, where S (total_sequence)
is the mask's width; attention reads rows :S. It has no `present.*` outputs: the buffer is the
cache. The runtime keeps S < kv_capacity (one spare slot): slicing `cache[:, :, :S]` makes export
guard S != capacity (a contiguity check), and `torch._check(S < C)` is what lets it drop that guard.
No tensor is ever zero-sized (a prefill is S == T), so one package serves prefill and decode, with
dynamic batch, sequence, total_sequence and kv_capacity.

Dims: batch 1..max_batch, sequence and total_sequence 1..max_seq_len, kv_capacity 3..max_seq_len+1.
Examples avoid 0 and 1 (export specializes them); the packages run 1 all the same, because the
compile turns off AOTI's lower-bound input checks (`aot_inductor.check_lowerbound`).

Packages are tied to the compiling torch (the loader and the library share the `aoti_torch_*` C
shim: runtimes refuse another major.minor) and to its CPU instruction set (`AOTI_CPU_ISA` in the
package metadata: runtimes refuse a CPU that lacks it). `autotune` (freezing + max_autotune) swaps
ATen/MKL GEMMs for Inductor's own micro-kernels after timing them: slower to build, and only as good
as the machine is quiet; meant for release builds on the target CPU.

All segments of one export share one Inductor cache (a temporary folder inside the engine's, removed
at the end), so segments with identical code (ranks 1..p-1 of a group) reuse compiled objects.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import time
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from cqil.errors import CqilError, first_line
from cqil.exporters.schema import AOTI_DEVICES, KV_CAPACITY
from cqil.model.model import Attention
from cqil.passes.partition import Partition, Segment

KV_LAYOUT = "buffer"
MODEL_NAME = "model"  # the folder inside a package that aoti_compile_and_package writes
_EXAMPLE = {"batch": 2, "sequence": 3, "total_sequence": 8, KV_CAPACITY: 13}  # no 0 or 1 (see above)
MIN_SEQ_LEN = 8  # the examples must fit


class BufferAttention(Attention):
    """Attention that writes the step's keys/values into the caller's buffers in place."""

    def forward(self, x, cos, sin, mask, past_key, past_value):
        q, k, v = self.project(x, cos, sin)
        T, S = k.shape[2], mask.shape[-1]  # mask [B, 1, T, S]: S = cached + new positions
        torch._check(S < past_key.shape[2])  # the runtime keeps a spare slot (module docstring)
        past_key[:, :, S - T:S].copy_(k)  # [B, kvh, T, hd] into [B, kvh, C, hd]
        past_value[:, :, S - T:S].copy_(v)
        key, value = past_key[:, :, :S], past_value[:, :, :S]
        return self.attend(q, key, value, mask), key, value


def to_buffer_form(seg: Segment) -> tuple[fx.GraphModule, list[str]]:
    """A copy of the segment's GraphModule in buffer form and its output names (no presents).

    The copy shares the segment's weights; its Attention modules are shallow copies whose class is
    BufferAttention (the segment itself, and the model it shares modules with, stay as they are).
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in seg.gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    output = graph.output_node()
    kept = [(value, name) for value, name in zip(output.args[0], seg.outputs) if not name.startswith("present.")]
    output.args = (tuple(value for value, _ in kept),)
    gm = fx.GraphModule(seg.gm, graph, f"{type(seg.gm).__name__}Buffer")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for name, module in list(gm.named_modules()):
        if type(module) is Attention:
            clone = copy.copy(module)  # shares the parameter table: releasing weights reaches it too
            clone.__class__ = BufferAttention
            owner, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, attr, clone)
    return gm, [name for _, name in kept]


def package_tensors(onnx_rec: dict, outputs: list[str]) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) tensor records of a package, from its segment's ONNX record."""
    inputs = []
    for t in onnx_rec["inputs"]:
        t = dict(t)  # a record of its own: later ONNX passes may edit theirs
        if t["name"].startswith("past_key_values."):
            b, heads, _, dim = t["shape"]
            t.update(shape=[b, heads, KV_CAPACITY, dim], kv_buffer=True)
        inputs.append(t)
    by_name = {t["name"]: t for t in onnx_rec["outputs"]}
    return inputs, [dict(by_name[n]) for n in outputs]


def dims(max_seq_len: int, max_batch: int) -> dict:
    """The dynamic dims of every package, as recorded in the manifest: name -> [min, max]."""
    return {"batch": [1, max_batch], "sequence": [1, max_seq_len], "total_sequence": [1, max_seq_len],
            KV_CAPACITY: [3, max_seq_len + 1]}


def _export_dims(ranges: dict) -> dict:
    # torch.export reasons about sizes >= 2 (0 and 1 specialize); the packages still run 1 (see above)
    return {name: torch.export.Dim(name, min=max(lo, 2), max=max(hi, 3)) for name, (lo, hi) in ranges.items()}


def _example(t: dict, cfg, device) -> torch.Tensor:
    shape = [_EXAMPLE[d] if isinstance(d, str) else d for d in t["shape"]]
    dtype = getattr(torch, t["dtype"])
    name = t["name"]
    if name == "input_ids":
        return torch.randint(0, cfg.vocab_size, shape, device=device)
    if name == "position_ids":
        S, T = _EXAMPLE["total_sequence"], _EXAMPLE["sequence"]
        return torch.arange(S - T, S, device=device).expand(*shape).contiguous()
    if name == "attention_mask" or dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    if t.get("kv_buffer"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.randn(shape, device=device).to(dtype)


def inductor_configs(autotune: bool) -> dict:
    configs = {"aot_inductor.check_lowerbound": False}
    if autotune:
        configs.update({"freezing": True, "max_autotune": True})
    return configs


def package_metadata(path: Path) -> dict[str, str]:
    """The metadata AOTInductor stored in a package (device, CPU ISA, platform), read from the archive."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith(".wrapper_metadata.json")]
        if not names:
            raise CqilError(f"export: {path.name} holds no AOTInductor metadata")
        return json.loads(z.read(names[0]))


def export_package(seg: Segment, onnx_rec: dict, path: Path, cfg, ranges: dict, configs: dict,
                   device: str) -> dict:
    """Compile one segment (weights materialized) into `path`; returns its manifest record."""
    gm, outputs = to_buffer_form(seg)
    inputs, output_recs = package_tensors(onnx_rec, outputs)
    if device != "cpu":
        gm = gm.to(device)
    example = tuple(_example(t, cfg, device) for t in inputs)
    export_dims = _export_dims(ranges)
    dynamic = tuple({i: export_dims[d] for i, d in enumerate(t["shape"]) if isinstance(d, str)} for t in inputs)
    unknown = {d for t in inputs for d in t["shape"] if isinstance(d, str)} - set(export_dims)
    if unknown:
        raise CqilError(f"export: rank{seg.rank}/{seg.name} has inputs with axes {sorted(unknown)}, "
                        f"which a package cannot take")
    t0 = time.perf_counter()
    quiet = logging.getLogger("torch")
    level = quiet.level
    # export's notes on guards and specializations, and autotuning's tables (written to sys.stderr),
    # are not for users: a failure is reported as one line below
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)
        try:
            with torch.no_grad():
                ep = torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)
            t1 = time.perf_counter()
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=dict(configs))
        except CqilError:
            raise
        except Exception as e:
            raise CqilError(f"export: AOTInductor could not compile rank{seg.rank}/{seg.name}: "
                            f"{type(e).__name__}: {first_line(e)}") from None
        finally:
            quiet.setLevel(level)
    t2 = time.perf_counter()
    del ep
    return {"file": f"rank{seg.rank}/{path.name}", "inputs": inputs, "outputs": output_recs,
            "export_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def check_request(device: str, max_seq_len: int, max_batch: int):
    """Refuse what this machine cannot build, before the slow part (one line each)."""
    if device not in AOTI_DEVICES:
        raise CqilError(f"--devices {device!r}: AOTInductor packages are built for one of {', '.join(AOTI_DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise CqilError(f"--devices cuda: CUDA packages are compiled on a CUDA machine, and torch sees none "
                        f"({why}); compile with --devices cpu")
    if max_seq_len < MIN_SEQ_LEN:
        raise CqilError(f"--formats aoti needs --max-seq-len >= {MIN_SEQ_LEN} (the export's example sizes), "
                        f"got {max_seq_len}")
    if max_batch < 1:
        raise CqilError(f"--max-batch must be >= 1, got {max_batch}")


def export_packages(part: Partition, onnx_records: dict[int, list[dict]], folder: Path,
                    materialize: Callable[[Segment], None], release: Callable[[Segment], None], *,
                    cfg, max_seq_len: int, max_batch: int, device: str = "cpu", autotune: bool = False,
                    progress=None, log=print) -> tuple[dict, list[str]]:
    """Compile every segment into folder/rank{r}/seg{i}.pt2.

    Adds an "aoti" record (file, inputs, outputs, timings) to each segment's ONNX record and returns
    the engine-level record (device, torch, CPU ISA, dims, KV layout, configs) and the files written.
    """
    from torch._inductor.utils import fresh_cache

    check_request(device, max_seq_len, max_batch)
    ranges, configs = dims(max_seq_len, max_batch), inductor_configs(autotune)
    files, metadata = [], None
    t0 = time.perf_counter()
    with fresh_cache(dir=str(folder)):  # one cache for the whole export, removed at the end
        for rank, segments in part.segments.items():
            for seg, rec in zip(segments, onnx_records[rank]):
                path = folder / f"rank{rank}" / f"{seg.name}.pt2"
                materialize(seg)
                try:
                    rec["aoti"] = export_package(seg, rec, path, cfg, ranges, configs, device)
                finally:
                    release(seg)
                files.append(rec["aoti"]["file"])
                metadata = metadata or package_metadata(path)
                logging.getLogger("cqil").debug(
                    f"aoti: rank{rank}/{seg.name}: export {rec['aoti']['export_s']:.1f} s, compile "
                    f"{rec['aoti']['compile_s']:.1f} s, {path.stat().st_size / 2**20:.1f} MiB")
                if progress is not None:
                    progress.update(1)
    seconds = time.perf_counter() - t0
    log(f"aoti: {len(files)} packages for {device} in {seconds:.1f} s")
    record = {
        "device": device,
        "torch": torch.__version__,
        "isa": metadata.get("AOTI_CPU_ISA", "") if device == "cpu" else "",
        "machine": metadata.get("AOTI_MACHINE", ""),
        "platform": metadata.get("AOTI_PLATFORM", ""),
        **({"compute_capability": metadata.get("AOTI_COMPUTE_CAPABILITY", "")} if device == "cuda" else {}),
        "kv_layout": KV_LAYOUT,
        "model_name": MODEL_NAME,
        "dims": ranges,
        "inductor_configs": configs,
        "seconds": round(seconds, 1),
    }
    return record, files
