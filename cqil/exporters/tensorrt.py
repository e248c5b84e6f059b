"""Build a TensorRT engine (`rank{r}/seg{i}.engine`) from each exported ONNX segment.

    cqil-compile MODEL --p 2 -o ENGINE --backend tensorrt [--dtype float16] [--max-batch 8]

Per segment: `trt.OnnxParser` fills a network from the segment's ONNX file and
`build_serialized_network` writes the serialized engine. One timing cache is shared by every
segment (layers of the same shape are timed once) and saved as `timing.cache`.

Precision: networks are **strongly typed** by default: every tensor keeps the type the ONNX file
gives it, so the fp32 mask-add and softmax stay fp32 in an fp16 engine (with weak typing and the
FP16 flag TensorRT may run them in fp16, where -65504 + a score overflows to -inf and left-padded
rows turn NaN), and no precision flag is needed (TensorRT 11 removed `BuilderFlag.FP16`/`BF16`).
`strongly_typed=False` builds the old way, with the dtype's flag, on TensorRT releases that have it.

Optimization profiles, from the manifest's dynamic axis names (`profiles`): TensorRT sizes each
context's activation memory for the largest shapes of its profiles, and a profile must hold
`total_sequence = past_sequence + sequence` at its min, opt and max. One box covering every step
would need total up to 2 * max_seq_len - 1; three profiles keep every total within max_seq_len:

    decode   sequence 1                 past 0 .. max_seq_len - 1     total 1 .. max_seq_len
    prefill  sequence 1 .. max_seq_len  past 0                        total 1 .. max_seq_len
    chunk    sequence 1 .. max_seq_len/2  past 0 .. max_seq_len/2     total 1 .. max_seq_len

(batch 1 .. max_batch everywhere). The runtime picks the first profile a step fits; a step of
several tokens after more than max_seq_len/2 positions fits none and is refused.

TensorRT engines only load under the TensorRT version and on the GPU (compute capability) that built
them; the manifest's `tensorrt` record says which, and `check_engine_compatibility` refuses the rest.
"""

from __future__ import annotations

from pathlib import Path

from cqil.errors import CqilError

ENGINE_SUFFIX = ".engine"
TIMING_CACHE = "timing.cache"
PRECISION_FLAGS = {"float32": (), "float16": ("FP16",), "bfloat16": ("BF16",)}
PROFILES = ("decode", "prefill", "chunk")


def require_tensorrt():
    """`import tensorrt`, or a one-line error saying it is missing."""
    try:
        import tensorrt
    except ImportError:
        raise CqilError("TensorRT is not installed: --backend tensorrt needs the `tensorrt` Python package "
                        "(pip install tensorrt, from NVIDIA's index) and a CUDA GPU") from None
    return tensorrt


def profiles(max_batch: int, max_seq_len: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Profile name -> (min, opt, max) of each named dynamic axis; see the module docstring."""
    if max_batch < 1 or max_seq_len < 1:
        raise CqilError(f"tensorrt: max_batch ({max_batch}) and max_seq_len ({max_seq_len}) must be positive")
    L, half = max_seq_len, max(max_seq_len // 2, 1)
    past_opt = L // 2
    batch = (1, 1, max_batch)
    return {
        "decode": {"batch": batch, "sequence": (1, 1, 1), "past_sequence": (0, past_opt, L - 1),
                   "total_sequence": (1, past_opt + 1, L)},
        "prefill": {"batch": batch, "sequence": (1, min(128, L), L), "past_sequence": (0, 0, 0),
                    "total_sequence": (1, min(128, L), L)},
        "chunk": {"batch": batch, "sequence": (1, 1, half), "past_sequence": (0, 0, L - half),
                  "total_sequence": (1, 1, L)},
    }


def profile_for(profile_axes: dict[str, dict], batch: int, sequence: int, past: int) -> int | None:
    """Index of the first profile whose ranges hold this step, or None."""
    step = {"batch": batch, "sequence": sequence, "past_sequence": past, "total_sequence": past + sequence}
    for i, name in enumerate(PROFILES):
        axes = profile_axes[name]
        if all(axes[k][0] <= v <= axes[k][2] for k, v in step.items()):
            return i
    return None


def input_profile(inputs: list[dict], axes: dict[str, tuple[int, int, int]]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Input name -> (min shape, opt shape, max shape), from manifest tensor specs."""
    profile = {}
    for spec in inputs:
        shapes = ([], [], [])
        for dim in spec["shape"]:
            if isinstance(dim, str):
                if dim not in axes:
                    raise CqilError(f"tensorrt: input {spec['name']} has dynamic axis {dim!r}, which has no range "
                                    f"(known: {', '.join(axes)})")
                for i in range(3):
                    shapes[i].append(axes[dim][i])
            else:
                for i in range(3):
                    shapes[i].append(int(dim))
        profile[spec["name"]] = tuple(tuple(s) for s in shapes)
    return profile


def _release(version: str) -> str:
    return ".".join(str(version).split(".")[:3])


def _capability(cc) -> str:
    return f"{cc[0]}.{cc[1]}" if isinstance(cc, (tuple, list)) else str(cc)


def check_engine_compatibility(record: dict | None, trt_version: str, compute_capability) -> None:
    """Refuse engines built by another TensorRT release or for another GPU architecture, by name.

    `record` is the manifest's "tensorrt" entry; `compute_capability` is "9.0" or (9, 0).
    """
    if not record:
        raise CqilError("engine: it has no TensorRT engines; recompile it with --backend tensorrt")
    built, here = _release(record.get("tensorrt_version", "?")), _release(trt_version)
    if built != here:
        raise CqilError(f"engine: its TensorRT engines were built with TensorRT {built}, this is TensorRT {here}; "
                        f"engines load only in the release that built them: recompile with --backend tensorrt here")
    built_cc, here_cc = _capability(record.get("compute_capability", "?")), _capability(compute_capability)
    if built_cc != here_cc:
        device = f" ({record['device_name']})" if record.get("device_name") else ""
        raise CqilError(f"engine: its TensorRT engines were built for compute capability {built_cc}{device}, this GPU "
                        f"is {here_cc}; recompile with --backend tensorrt on this GPU")


def build_engines(engine_dir: Path, records: dict[int, list[dict]], dtype: str, max_batch: int, max_seq_len: int,
                device: int = 0, strongly_typed: bool = True, workspace_bytes: int | None = None,
                log=print) -> tuple[dict, list[str]]:
    """Build `rank{r}/seg{i}.engine` for every segment record (adds its "tensorrt_engine" key).

    Returns the manifest's "tensorrt" record and the files written (relative to engine_dir).
    """
    trt = require_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise CqilError("tensorrt: building engines needs a CUDA GPU, and torch sees none")
    if dtype not in PRECISION_FLAGS:
        raise CqilError(f"tensorrt: dtype {dtype} is not supported (use {', '.join(PRECISION_FLAGS)})")
    torch.cuda.set_device(device)  # the builder uses the current device
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    axes = profiles(max_batch, max_seq_len)
    flags = () if strongly_typed else PRECISION_FLAGS[dtype]
    cache_path = engine_dir / TIMING_CACHE
    cache_config = builder.create_builder_config()
    cache = cache_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    files = []
    for rank, recs in records.items():
        for rec in recs:
            onnx_path = engine_dir / rec["files"][0]
            shapes = [input_profile(rec["inputs"], axes[name]) for name in PROFILES]
            serialized = _build_one(trt, builder, logger, onnx_path, rec, shapes, flags, cache, strongly_typed,
                                    workspace_bytes)
            rel = f"rank{rank}/{rec['name']}{ENGINE_SUFFIX}"
            (engine_dir / rel).write_bytes(serialized)
            rec["tensorrt_engine"] = rel
            files.append(rel)
            log(f"tensorrt: built {rel} ({len(serialized) / 2**20:.1f} MiB)")
    cache_path.write_bytes(bytes(cache.serialize()))
    files.append(TIMING_CACHE)
    record = {
        "tensorrt_version": trt.__version__,
        "compute_capability": _capability(torch.cuda.get_device_capability(device)),
        "device_name": torch.cuda.get_device_name(device),
        "precision_flags": list(flags),
        "strongly_typed": strongly_typed,
        "max_batch": max_batch,
        "profiles": {name: {k: list(v) for k, v in ax.items()} for name, ax in axes.items()},
        "timing_cache": TIMING_CACHE,
    }
    return record, files


def _build_one(trt, builder, logger, onnx_path: Path, rec: dict, shapes: list[dict], flags, cache, strongly_typed,
               workspace_bytes) -> bytes:
    network_flags = 0
    if strongly_typed:
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10 on
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so that external weights are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CqilError(f"tensorrt: cannot parse {onnx_path.name} of {rec['name']}: {errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(shapes[0]):
        raise CqilError(f"tensorrt: {onnx_path.name} has inputs {names}, the manifest lists {sorted(shapes[0])}")
    config = builder.create_builder_config()
    for flag in flags:
        if not hasattr(trt.BuilderFlag, flag):
            raise CqilError(f"tensorrt: this TensorRT ({trt.__version__}) has no {flag} builder flag; build "
                            f"strongly typed (the default)")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in shapes:  # in PROFILES order: the runtime selects them by index
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.items():
            opt.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CqilError(f"tensorrt: building the engine of {onnx_path} failed (see TensorRT's log above)")
    return bytes(serialized)
