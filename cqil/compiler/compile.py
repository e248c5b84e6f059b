"""`cqil.compile`: checkpoint folder -> engine directory.

    checkpoint --(meta model, plan)--> CQIL GraphModule --partition--> segments
               --export, one segment's weights at a time--> tmp dir --rename--> engine_dir

The engine directory is built in a temporary sibling folder and renamed into place at the end,
so an interrupted or failed compile leaves the destination untouched.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from cqil.compiler.config import ModelConfig
from cqil.compiler.loader import Checkpoint, Weights, build_meta_model, load_model, param_names, parse_dtype
from cqil.compiler.pipeline import build_graph, resolve_plan
from cqil.errors import CqilError
from cqil.exporters.manifest import FORMAT_VERSION, file_records, write_manifest
from cqil.passes.partition import MAX_SEGMENT_BYTES, partition

FORMATS = ("onnx", "torch", "tensorrt")  # onnx always: tensor specs and the TensorRT build come from it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


def toolchain() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import cqil
    from cqil.exporters.onnx import OPSET

    return {"cqil": cqil.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__, "opset": OPSET}


def check_formats(formats) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys([formats] if isinstance(formats, str) else formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CqilError(f"unknown format(s) {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    if "onnx" not in formats:
        raise CqilError(f"formats {','.join(formats)} lack onnx: every engine has its ONNX segments "
                        f"(the manifest's tensor specs and the TensorRT build come from them)")
    return formats


def check_destination(out_dir: Path, force: bool):
    if out_dir.exists() and not out_dir.is_dir():
        raise CqilError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CqilError(f"output {out_dir} exists and is not empty; pass --force to replace it")


def compile_model(model_dir, out_dir, p: int | None = None, start: int | None = None, end: int | None = None,
                  bypass: int | None = None, semantics: str | None = None, replicate_outer: bool = False,
                  dtype: str = "float32", max_seq_len: int | None = None, force: bool = False,
                  adapter=None, allow_plan_mismatch: bool = False, max_segment_bytes: int | None = MAX_SEGMENT_BYTES,
                  progress: bool = True, log=print,
                  formats=("onnx",), max_batch: int = 8) -> Path:
    """Compile `model_dir` into the engine directory `out_dir`; returns its path.

    `max_segment_bytes` caps the weights of one exported segment (None: cut at collectives only);
    with streaming, about this much weight is in memory at a time, times the exporter's copies.
    """
    from tqdm import tqdm

    from cqil.exporters.onnx import export_partition

    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_destination(out_dir, force)
    formats = check_formats(formats)  # "onnx", plus "torch" (rank weights), "tensorrt" (plans)
    if "tensorrt" in formats:  # fail before the slow part
        from cqil.exporters.tensorrt import require_tensorrt
        require_tensorrt()
    cfg = ModelConfig.from_dir(model_dir)
    max_seq_len = int(max_seq_len or cfg.max_position_embeddings)
    if max_seq_len < 1:
        raise CqilError(f"--max-seq-len must be positive, got {max_seq_len}")
    cfg.check_sequence_length(max_seq_len)
    parse_dtype(dtype)
    plan, source = resolve_plan(cfg, p=p, start=start, end=end, bypass=bypass, semantics=semantics,
                                replicate_outer=replicate_outer)
    log(f"plan ({source}): {plan}")
    if plan.p > 1 and not plan.groups:
        log(f"warning: the range [{plan.start}, {plan.end}) holds no group; the model runs unchanged on rank 0")

    if adapter is not None:  # merging needs the whole model in memory
        from cqil.quality.adapter import merge_adapter

        model = load_model(model_dir, dtype="float32", max_seq_len=max_seq_len, cfg=cfg)
        model = merge_adapter(model, adapter, plan, allow_plan_mismatch=allow_plan_mismatch)
        model = model.to(parse_dtype(dtype)) if dtype not in ("float32", "fp32") else model
        model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.float()
        load = unload = lambda names: None
    else:  # stream: one segment's weights at a time
        model = build_meta_model(cfg, max_seq_len, dtype)
        weights = Weights(model_dir, model, dtype)
        load, unload = weights.materialize, weights.release
    materialize = lambda seg: load(param_names(seg.gm))
    release = lambda seg: unload(param_names(seg.gm))

    part = partition(build_graph(model, plan), max_segment_bytes=max_segment_bytes)
    n_segments = sum(len(s) for s in part.segments.values())
    log(f"segments per rank: {', '.join(f'rank {r}: {len(s)}' for r, s in part.segments.items())}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the engine should be like any other folder
    try:
        bar = tqdm(total=n_segments, desc="export", unit="segment", disable=not progress)
        records = export_partition(part, cfg, parse_dtype(dtype), tmp, materialize, release, bar)
        bar.close()
        extra_files, rank_weights, trt_record = [], {}, None
        if "torch" in formats:
            from cqil.exporters.torch_weights import export_torch_weights

            rank_weights = export_torch_weights(part, tmp, cfg.tie_word_embeddings, load, unload)
            extra_files += [w["file"] for w in rank_weights.values()]
        if "tensorrt" in formats:
            from cqil.exporters.tensorrt import build_plans

            trt_record, trt_files = build_plans(tmp, records, str(parse_dtype(dtype)).removeprefix("torch."),
                                                max_batch=max_batch, max_seq_len=max_seq_len, log=log)
            extra_files += trt_files
        tokenizer = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
        for f in tokenizer:
            shutil.copy2(model_dir / f, tmp / f)
        files = tokenizer + [f for recs in records.values() for r in recs for f in r["files"]] + extra_files
        manifest = {
            "format_version": FORMAT_VERSION,
            "toolchain": toolchain(),
            "formats": list(formats),
            "model": cfg.to_dict(),
            "plan": plan.to_dict(),
            "dtype": str(parse_dtype(dtype)).removeprefix("torch."),
            "max_seq_len": max_seq_len,
            "max_segment_bytes": max_segment_bytes,  # the runtime's torch backend re-partitions with it
            "ranks": [{"rank": r, "layers": list(plan.layers_of(r)),
                       "kv_layers": sorted({l for rec in recs for l in rec["layers"]}),
                       "program": [s.to_dict() for s in part.programs[r]],
                       "segments": recs, **({"weights": rank_weights[r]} if r in rank_weights else {})}
                      for r, recs in records.items()],
            **({"tensorrt": trt_record} if trt_record else {}),
            "tokenizer_files": tokenizer,
            "files": file_records(tmp, files),
            "source": {"model_dir": str(model_dir.resolve()), "adapter": str(adapter) if adapter else None},
        }
        write_manifest(tmp, manifest)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark (KiB on Linux)
    checkpoint = Checkpoint(model_dir).file_bytes()
    engine = sum(r["bytes"] for r in manifest["files"].values())
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
