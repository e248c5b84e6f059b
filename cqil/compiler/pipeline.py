"""The compile pipeline: a checkpoint and a plan -> the files and manifest of an engine directory.

    checkpoint --(meta model, plan)--> CQIL GraphModule --partition--> segments
               --exporters, one segment's weights at a time--> folder/rank{r}/..., manifest

Weights stream one segment at a time (`Weights.materialize` / `release`), so a compile holds about
one segment's weights, whatever the model's size. With an adapter the whole model is loaded in
float32 to merge it first. Where the folder lives and how it replaces an older engine is
`cqil.compiler.compile`'s business.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from cqil.errors import CqilError
from cqil.exporters.manifest import FORMAT_VERSION, file_records
from cqil.exporters.quantize import Quantization
from cqil.model.config import ModelConfig
from cqil.model.loader import Weights, build_meta_model, load_model, param_names, parse_dtype
from cqil.model.tokenizer import TOKENIZER_FILES
from cqil.passes import build_graph
from cqil.passes.partition import MAX_SEGMENT_BYTES, partition
from cqil.plan import Plan

FORMATS = ("onnx", "torch", "tensorrt", "aoti")
ENGINE_DTYPES = ("float32", "float16", "bfloat16")  # onnx always: tensor specs and the TensorRT build come from it


def check_formats(formats) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys([formats] if isinstance(formats, str) else formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CqilError(f"unknown format(s) {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    if "onnx" not in formats:
        raise CqilError(f"formats {','.join(formats)} lack onnx: every engine has its ONNX segments "
                        f"(the manifest's tensor specs and the TensorRT build come from them)")
    return formats


@dataclass(frozen=True)
class CompileOptions:
    dtype: str = "float32"
    max_seq_len: int = 2048
    formats: tuple[str, ...] = ("onnx",)
    max_segment_bytes: int | None = MAX_SEGMENT_BYTES
    adapter: str | None = None
    allow_plan_mismatch: bool = False
    max_batch: int = 8  # TensorRT profiles, AOTInductor packages
    devices: str = "cpu"  # what AOTInductor packages are compiled for: cpu or cuda
    aoti_autotune: bool = False  # AOTInductor freezing + max_autotune (release builds on the target CPU)
    fuse: bool = True  # ONNX Runtime's fused operators in the ONNX segments (cqil.exporters.fuse)
    quant: "Quantization | None" = None  # weight-only int4/int8 of the ONNX segments (cqil.exporters.quantize)

    def __post_init__(self):
        object.__setattr__(self, "formats", check_formats(self.formats))
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise CqilError(f"--max-seq-len must be a positive integer, got {self.max_seq_len!r}")
        if self.max_segment_bytes is not None and self.max_segment_bytes < 1:
            raise CqilError(f"--max-segment-mb must be positive (or 0: no cap), got {self.max_segment_bytes} bytes")
        parse_dtype(self.dtype)

    @property
    def torch_dtype(self):
        return parse_dtype(self.dtype)

    @property
    def dtype_name(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")


def rewrite_onnx(records: dict[int, list[dict]], folder: Path, cfg: ModelConfig, options: CompileOptions,
                 progress: bool) -> dict:
    """Fuse and quantize every ONNX segment in place (as `options` asks); returns op counts over all."""
    import collections

    from tqdm import tqdm

    totals = collections.Counter()
    if not options.fuse and options.quant is None:
        return {}
    from cqil.exporters.fuse import fuse_segment
    from cqil.exporters.quantize import quantize_segment

    segments = [rec for recs in records.values() for rec in recs]
    for rec in tqdm(segments, desc="fuse/quantize", unit="segment", disable=not progress):
        path = folder / rec["files"][0]
        if options.fuse:
            totals.update(fuse_segment(path, cfg))
        if options.quant is not None:
            totals.update(quantize_segment(path, options.quant))
    return dict(totals)


def toolchain() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import cqil
    from cqil.exporters.onnx import OPSET

    return {"cqil": cqil.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__, "opset": OPSET}


def write_engine(model_dir: Path, cfg: ModelConfig, plan: Plan, options: CompileOptions, folder: Path,
                 progress: bool = True, log=print) -> dict:
    """Export every segment of `plan` into `folder` (which exists and is empty); returns the manifest."""
    from tqdm import tqdm

    from cqil.exporters.onnx import export_partition

    if options.adapter is not None:  # merging needs the whole model in memory
        model = load_model(model_dir, dtype=options.dtype, max_seq_len=options.max_seq_len, cfg=cfg,
                           adapter=options.adapter, plan=plan, allow_plan_mismatch=options.allow_plan_mismatch)
        load = unload = lambda names: None
    else:  # stream: one segment's weights at a time
        model = build_meta_model(cfg, options.max_seq_len, options.dtype)
        weights = Weights(model_dir, model, options.dtype)
        load, unload = weights.materialize, weights.release

    part = partition(build_graph(model, plan), max_segment_bytes=options.max_segment_bytes)
    n_segments = sum(len(s) for s in part.segments.values())
    log(f"segments per rank: {', '.join(f'rank {r}: {len(s)}' for r, s in part.segments.items())}")
    bar = tqdm(total=n_segments, desc="export", unit="segment", disable=not progress)
    records = export_partition(part, cfg, options.torch_dtype, folder, lambda seg: load(param_names(seg.gm)),
                               lambda seg: unload(param_names(seg.gm)), bar)
    bar.close()
    extra_files, rank_weights, trt_record = [], {}, None
    if "torch" in options.formats:
        from cqil.exporters.torch_weights import export_torch_weights

        rank_weights = export_torch_weights(part, folder, cfg.tie_word_embeddings, load, unload)
        extra_files += [w["file"] for w in rank_weights.values()]
    if "tensorrt" in options.formats:
        from cqil.exporters.tensorrt import build_engines

        trt_record, trt_files = build_engines(folder, records, options.dtype_name, max_batch=options.max_batch,
                                              max_seq_len=options.max_seq_len, log=log)
        extra_files += trt_files
    aoti_record = None
    if "aoti" in options.formats:
        from cqil.exporters.aoti import export_packages

        bar = tqdm(total=n_segments, desc="aoti", unit="segment", disable=not progress)
        aoti_record, aoti_files = export_packages(
            part, records, folder, lambda seg: load(param_names(seg.gm)), lambda seg: unload(param_names(seg.gm)),
            cfg=cfg, max_seq_len=options.max_seq_len, max_batch=options.max_batch, device=options.devices,
            autotune=options.aoti_autotune, progress=bar, log=log)
        bar.close()
        extra_files += aoti_files
    onnx_ops = rewrite_onnx(records, folder, cfg, options, progress)  # after TensorRT: it reads plain ONNX
    tokenizer = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    for f in tokenizer:
        shutil.copy2(model_dir / f, folder / f)
    files = tokenizer + [f for recs in records.values() for r in recs for f in r["files"]] + extra_files
    return {
        "format_version": FORMAT_VERSION,
        "toolchain": toolchain(),
        "formats": list(options.formats),
        "model": cfg.to_dict(),
        "plan": plan.to_dict(),
        "dtype": options.dtype_name,
        "max_seq_len": options.max_seq_len,
        "max_segment_bytes": options.max_segment_bytes,  # the runtime's torch backend re-partitions with it
        "ranks": [{"rank": r, "layers": list(plan.layers_of(r)),
                   "kv_layers": sorted({l for rec in recs for l in rec["layers"]}),
                   "program": [s.to_dict() for s in part.programs[r]],
                   "segments": recs, **({"weights": rank_weights[r]} if r in rank_weights else {})}
                  for r, recs in records.items()],
        "fused": options.fuse,
        "quantization": options.quant.to_dict() if options.quant else None,
        "onnx_ops": onnx_ops,
        **({"tensorrt": trt_record} if trt_record else {}),
        **({"aoti": aoti_record} if aoti_record else {}),
        "tokenizer_files": tokenizer,
        "files": file_records(folder, files),
        "source": {"model_dir": str(model_dir.resolve()), "adapter": str(options.adapter) if options.adapter else None},
    }
