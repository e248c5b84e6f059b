"""The TensorRT backend: one deserialized engine and execution context per segment.

    engine = cqil.load("engine_dir", backend="tensorrt", devices=["cuda:0", "cuda:1"])

Options: `devices` (as the torch backend's, CUDA only).

Needs an engine compiled with `--backend tensorrt` on the same TensorRT release and GPU
architecture (`check_engine_compatibility` refuses others before anything is deserialized). Values
are torch CUDA tensors, handled as in the torch backend (`DeviceRank`: per-rank device and
stream, numpy inputs converted once, logits returned as numpy, `DeviceCollectives` between ranks).
Each call selects the optimization profile the step fits (`cqil.exporters.tensorrt.profile_for`),
sets the input shapes and addresses, allocates the outputs at the shapes TensorRT infers
(`get_tensor_shape`) and enqueues `execute_async_v3` on the rank's stream; nothing synchronises
the host. The KV cache is the ONNX form (`present` = past ++ new, a fresh tensor per step).

Activation memory: the contexts of a rank run one after another on its stream, so they share one
device buffer (user-managed allocation), as large as the largest segment needs over all its
profiles; its size is logged when the rank opens. Not here: CUDA graphs around engines.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from cqil.errors import CqilError
from cqil.exporters.tensorrt import check_engine_compatibility, profile_for, require_tensorrt
from cqil.runtime.backends.device import DeviceRank, parse_devices
from cqil.runtime.kv_cache import ConcatCache

OPTIONS = frozenset({"devices"})
log = logging.getLogger(__name__)
_RUNTIME = {}  # one trt.Runtime per process; it must outlive the engines it deserialized


def torch_dtype(trt, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    for name, t in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return t
    raise CqilError(f"tensorrt: tensor type {dtype} has no torch equivalent here")


def device_memory_size(trt_engine) -> int:
    """Activation memory a context of `trt_engine` needs, over all its profiles (TensorRT 10.1 renamed it)."""
    size = getattr(trt_engine, "device_memory_size_v2", None)
    return int(trt_engine.device_memory_size if size is None else size)


class TrtSegment:
    def __init__(self, rank: "TrtRank", trt, trt_engine, rec: dict, path: Path):
        self.rank, self.trt_engine = rank, trt_engine
        self.context = trt_engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise CqilError(f"engine: cannot create an execution context for {path.name} (out of GPU memory?)")
        self.profile = 0
        self.inputs = [t["name"] for t in rec["inputs"]]
        self.outputs = [t["name"] for t in rec["outputs"]]
        io = [trt_engine.get_tensor_name(i) for i in range(trt_engine.num_io_tensors)]
        ins = [n for n in io if trt_engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in io if trt_engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(ins) != sorted(self.inputs) or sorted(outs) != sorted(self.outputs):
            raise CqilError(f"engine: {path.name} has inputs {ins} / outputs {outs}, the manifest says "
                            f"{self.inputs} / {self.outputs}")
        self.dtypes = {n: torch_dtype(trt, trt_engine.get_tensor_dtype(n)) for n in io}
        self.weight_bytes = rec.get("weight_bytes", 0)
        self._empty = torch.empty(256, dtype=torch.uint8, device=rank.device)  # address for 0-size tensors

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._empty.data_ptr()

    def _select_profile(self, env: dict, stream: int):
        (B, T), total = env["input_ids"].shape, env["attention_mask"].shape[1]
        index = profile_for(self.rank.profiles, B, T, total - T)
        if index is None:
            raise CqilError(f"engine: rank {self.rank.rank}: a step of {T} tokens after {total - T} (batch {B}) fits "
                            f"none of the TensorRT profiles (decode, prefill, chunks of up to half of max_seq_len); "
                            f"recompile with a larger --max-seq-len / --max-batch")
        if index != self.profile:
            self.context.set_optimization_profile_async(index, stream)
            self.profile = index

    def __call__(self, env: dict) -> None:
        r, ctx = self.rank, self.context
        with r.on_stream():
            stream = torch.cuda.current_stream(r.device).cuda_stream
            self._select_profile(env, stream)
            feeds = []  # kept alive until the work is queued; the stream orders any reuse after it
            for name in self.inputs:
                t = r.tensor(env, name, self.dtypes[name]).contiguous()
                feeds.append(t)
                if tuple(ctx.get_tensor_shape(name)) != tuple(t.shape) and not ctx.set_input_shape(name, tuple(t.shape)):
                    raise CqilError(f"engine: rank {r.rank}: {name} of shape {tuple(t.shape)} is outside the "
                                    f"engine's optimization profile (recompile with a larger --max-batch / --max-seq-len)")
                ctx.set_tensor_address(name, self._address(t))
            results = {}
            for name in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise CqilError(f"engine: rank {r.rank}: TensorRT cannot infer the shape of {name} ({shape})")
                out = torch.empty(shape, dtype=self.dtypes[name], device=r.device)
                ctx.set_tensor_address(name, self._address(out))
                results[name] = out
            if not ctx.execute_async_v3(stream):
                raise CqilError(f"engine: rank {r.rank}: TensorRT execution failed (see its log)")
            for name, value in results.items():
                env[name] = r.publish(name, value)


class TrtRank(DeviceRank):
    def __init__(self, spec, rank: int, device: torch.device, trt):
        from cqil.model.loader import parse_dtype

        super().__init__(rank, device, parse_dtype(spec.dtype))
        self.kv_layers = spec.kv_layers(rank)
        self._kv_shape = (spec.config.num_kv_heads, 0, spec.config.head_dim)
        self.profiles = spec.manifest["tensorrt"]["profiles"]
        self.segments = {}
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            for rec in spec.segments(rank):
                if "tensorrt_engine" not in rec:
                    raise CqilError(f"engine: rank{rank}/{rec['name']} has no TensorRT engine; "
                                    f"recompile with --backend tensorrt")
                path = spec.dir / rec["tensorrt_engine"]
                trt_engine = _runtime(trt).deserialize_cuda_engine(path.read_bytes())
                if trt_engine is None:
                    raise CqilError(f"engine: TensorRT cannot deserialize {rec['tensorrt_engine']} (see its log)")
                self.segments[rec["name"]] = TrtSegment(self, trt, trt_engine, rec, path)
            # one activation buffer for all of the rank's contexts: they never run at the same time
            size = max((device_memory_size(s.trt_engine) for s in self.segments.values()), default=0)
            self.activations = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
            for seg in self.segments.values():
                _set_device_memory(seg.context, self.activations.data_ptr(), size)
        log.info(f"tensorrt: rank {rank} on {device}: {len(self.segments)} contexts share "
                 f"{size / 2**20:.1f} MiB of activation memory")

    def new_cache(self, batch: int) -> ConcatCache:
        return ConcatCache(self.kv_layers, torch.zeros((batch, *self._kv_shape), dtype=self.dtype, device=self.device))

    def close(self):
        self.segments = {}
        self.activations = None


def _set_device_memory(context, address: int, size: int):
    setter = getattr(context, "set_device_memory", None)  # TensorRT >= 10.1
    if setter is not None:
        setter(address, size)
    else:
        context.device_memory = address


def _runtime(trt):
    if "runtime" not in _RUNTIME:
        _RUNTIME["logger"] = trt.Logger(trt.Logger.WARNING)
        _RUNTIME["runtime"] = trt.Runtime(_RUNTIME["logger"])
    return _RUNTIME["runtime"]


def open_rank(spec, rank: int, threads, ranks_in_process: int, devices=None) -> TrtRank:
    """`threads` is ONNX Runtime's business."""
    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise CqilError("engine: the tensorrt backend needs a CUDA GPU, and torch sees none")
    device = parse_devices(devices or "cuda", spec.ranks)[rank]
    if device.type != "cuda":
        raise CqilError(f"engine: the tensorrt backend runs on CUDA devices, rank {rank} was given {device}")
    check_engine_compatibility(spec.manifest.get("tensorrt"), trt.__version__, torch.cuda.get_device_capability(device))
    return TrtRank(spec, rank, device, trt)


def local_collectives(runners, timeout):
    from cqil.runtime.backends.device_collectives import DeviceCollectives

    ranks = list(runners.values())
    return DeviceCollectives([r.device for r in ranks], [r.stream for r in ranks], timeout)
