"""`cqil.compile`: checkpoint folder -> engine directory, written atomically.

The engine directory is built in a temporary sibling folder (`cqil.compiler.pipeline`) and put in
place in one step at the end (`cqil.compiler.destination`), so an interrupted or failed compile
leaves the destination as it was.
"""

from __future__ import annotations

import errno
import logging
import resource
import time
from pathlib import Path

from cqil.compiler.destination import Destination
from cqil.compiler.pipeline import ENGINE_DTYPES, CompileOptions, write_engine
from cqil.exporters.quantize import Quantization
from cqil.errors import CqilError
from cqil.exporters.manifest import write_manifest
from cqil.model.config import ModelConfig
from cqil.model.hub import resolve_model
from cqil.model.loader import Checkpoint
from cqil.passes.partition import MAX_SEGMENT_BYTES
from cqil.plan import Plan, check_parallel, resolve_plan


def compile_model(model_dir, out_dir, p: int | None = None, start: int | None = None, end: int | None = None,
                  bypass: int | None = None, semantics: str | None = None, replicate_outer: bool = False,
                  plan: Plan | None = None, plan_source: str = "given", dtype: str = "auto", max_seq_len: int | None = None,
                  force: bool = False, adapter=None, allow_plan_mismatch: bool = False,
                  max_segment_bytes: int | None = MAX_SEGMENT_BYTES, progress: bool = True, log=None,
                  formats=("onnx",), max_batch: int = 8, revision: str | None = None, cache_dir=None,
                  devices: str = "cpu", aoti_autotune: bool = False, fuse: bool = True,
                  quant: "str | Quantization | None" = None) -> Path:
    """Compile `model_dir` into the engine directory `out_dir`; returns its path.

    The plan is `plan` (found in `plan_source`, for the log), or the one the plan keywords describe
    (as the CLI's flags). `dtype` "auto" is the checkpoint's `torch_dtype` (float32 when it has
    none, or one engines do not take). `max_segment_bytes`
    caps the weights of one exported segment (None: cut at collectives only); with streaming, about
    this much weight is in memory at a time, times the exporter's copies. `fuse` puts ONNX Runtime's
    fused operators in the ONNX segments; `quant` ("int4", "int8" or a `Quantization`) quantizes their
    weights. `model_dir` may be a hub id
    (`org/name`, fetched at `revision` into the HF cache or `cache_dir`: cqil.model.hub). Progress
    lines go to `log` (default: the "cqil" logger at INFO). With "aoti" in `formats`, `devices` ("cpu"
    or "cuda") is what the AOTInductor packages are compiled for and `aoti_autotune` turns on
    Inductor's freezing + max_autotune (cqil.exporters.aoti).
    """
    t0 = time.perf_counter()
    log = log or logging.getLogger("cqil").info
    model_dir, out_dir = resolve_model(model_dir, revision, cache_dir), Path(out_dir)
    cfg = ModelConfig.from_dir(model_dir)
    dest = Destination(out_dir, model_dir, force)
    if dtype == "auto":  # as vLLM and TensorRT-LLM do: the checkpoint's own dtype
        dtype = cfg.torch_dtype if cfg.torch_dtype in ENGINE_DTYPES else "float32"
    options = CompileOptions(dtype=dtype, max_seq_len=cfg.max_position_embeddings if max_seq_len is None else max_seq_len,
                             formats=formats, max_segment_bytes=max_segment_bytes, adapter=adapter,
                             allow_plan_mismatch=allow_plan_mismatch, max_batch=max_batch, devices=devices,
                             aoti_autotune=aoti_autotune, fuse=fuse,
                             quant=Quantization(quant) if isinstance(quant, str) else quant)
    cfg.check_sequence_length(options.max_seq_len)
    if "tensorrt" in options.formats:  # fail before the slow part
        from cqil.exporters.tensorrt import require_tensorrt
        require_tensorrt()
    if "aoti" in options.formats:
        from cqil.exporters.aoti import check_request
        check_request(options.devices, options.max_seq_len, options.max_batch)
    if plan is None:
        plan, plan_source = resolve_plan(cfg.num_layers, p=p, start=start, end=end, bypass=bypass,
                                         semantics=semantics, replicate_outer=replicate_outer, authors=cfg.extra)
    if plan.num_layers != cfg.num_layers:
        raise CqilError(f"plan: it is for {plan.num_layers} layers, {model_dir} has {cfg.num_layers}")
    check_parallel(plan)

    tmp = dest.begin()
    try:
        manifest = write_engine(model_dir, cfg, plan, options, tmp, progress=progress, log=log)
        write_manifest(tmp, manifest)
        dest.commit(tmp)
    except OSError as e:  # a full disk, a folder made read-only meanwhile, ...
        dest.abort(tmp)
        where = e.filename or tmp
        if e.errno == errno.ENOSPC:
            raise CqilError(f"no space left on the device holding {out_dir} (writing {where}); nothing was "
                            f"replaced: free space or choose another -o") from None
        raise CqilError(f"cannot write the engine {out_dir}: {e.strerror or e} ({where}); nothing was replaced") from None
    except BaseException:
        dest.abort(tmp)
        raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark (KiB on Linux)
    checkpoint = Checkpoint(model_dir).file_bytes()
    engine = sum(r["bytes"] for r in manifest["files"].values())
    n_segments = sum(len(r["segments"]) for r in manifest["ranks"])
    log(f"plan ({plan_source}): {plan}")
    log(f"wrote {out_dir}: {n_segments} segments on {plan.p} rank(s) in {time.perf_counter() - t0:.1f} s; "
        f"peak RSS {peak / 2**20:.0f} MiB = {peak / checkpoint:.2f} x the checkpoint ({checkpoint / 2**20:.0f} MiB); "
        f"engine {engine / 2**20:.0f} MiB")
    return out_dir
