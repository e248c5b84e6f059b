"""`cqil.compile`: checkpoint folder -> engine directory, written atomically.

The engine directory is built in a temporary sibling folder (`cqil.compiler.pipeline`) and renamed
into place at the end, so an interrupted or failed compile leaves the destination untouched.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from cqil.compiler.pipeline import CompileOptions, write_engine
from cqil.errors import CqilError
from cqil.exporters.manifest import write_manifest
from cqil.model.config import ModelConfig
from cqil.model.loader import Checkpoint
from cqil.passes.partition import MAX_SEGMENT_BYTES
from cqil.plan import Plan, resolve_plan


def check_destination(out_dir: Path, force: bool):
    if out_dir.exists() and not out_dir.is_dir():
        raise CqilError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CqilError(f"output {out_dir} exists and is not empty; pass --force to replace it")


def compile_model(model_dir, out_dir, p: int | None = None, start: int | None = None, end: int | None = None,
                  bypass: int | None = None, semantics: str | None = None, replicate_outer: bool = False,
                  plan: Plan | None = None, plan_source: str = "given", dtype: str = "float32", max_seq_len: int | None = None,
                  force: bool = False, adapter=None, allow_plan_mismatch: bool = False,
                  max_segment_bytes: int | None = MAX_SEGMENT_BYTES, progress: bool = True, log=print,
                  formats=("onnx",), max_batch: int = 8) -> Path:
    """Compile `model_dir` into the engine directory `out_dir`; returns its path.

    The plan is `plan` (found in `plan_source`, for the log), or the one the plan keywords describe
    (as the CLI's flags). `max_segment_bytes`
    caps the weights of one exported segment (None: cut at collectives only); with streaming, about
    this much weight is in memory at a time, times the exporter's copies.
    """
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_destination(out_dir, force)
    cfg = ModelConfig.from_dir(model_dir)
    options = CompileOptions(dtype=dtype, max_seq_len=cfg.max_position_embeddings if max_seq_len is None else max_seq_len,
                             formats=formats, max_segment_bytes=max_segment_bytes, adapter=adapter,
                             allow_plan_mismatch=allow_plan_mismatch, max_batch=max_batch)
    cfg.check_sequence_length(options.max_seq_len)
    if "tensorrt" in options.formats:  # fail before the slow part
        from cqil.exporters.tensorrt import require_tensorrt
        require_tensorrt()
    if plan is None:
        plan, plan_source = resolve_plan(cfg.num_layers, p=p, start=start, end=end, bypass=bypass,
                                         semantics=semantics, replicate_outer=replicate_outer, authors=cfg.extra)
    log(f"plan ({plan_source}): {plan}")
    if plan.num_layers != cfg.num_layers:
        raise CqilError(f"plan: it is for {plan.num_layers} layers, {model_dir} has {cfg.num_layers}")
    if plan.p > 1 and not plan.groups:
        log(f"warning: the range [{plan.start}, {plan.end}) holds no group; the model runs unchanged on rank 0")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the engine should be like any other folder
    try:
        manifest = write_engine(model_dir, cfg, plan, options, tmp, progress=progress, log=log)
        write_manifest(tmp, manifest)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark (KiB on Linux)
    checkpoint = Checkpoint(model_dir).file_bytes()
    engine = sum(r["bytes"] for r in manifest["files"].values())
    n_segments = sum(len(r["segments"]) for r in manifest["ranks"])
    log(f"wrote {out_dir}: {n_segments} segments on {plan.p} rank(s) in {time.perf_counter() - t0:.1f} s; "
        f"peak RSS {peak / 2**20:.0f} MiB = {peak / checkpoint:.2f} x the checkpoint ({checkpoint / 2**20:.0f} MiB); "
        f"engine {engine / 2**20:.0f} MiB")
    return out_dir


def _replace(tmp: Path, out_dir: Path):
    """Move the finished engine into place; an existing folder is swapped out, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:  # interrupted between the two renames: put the previous engine back
        if old is not None and not out_dir.exists():
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
