"""The TensorRT backend: one deserialized plan and execution context per segment.

    engine = cqil.load("engine_dir", backend="tensorrt", devices=["cuda:0", "cuda:1"])

Needs an engine compiled with `--backend tensorrt` on the same TensorRT release and GPU
architecture (`check_plan_compatibility` refuses others before anything is deserialized). Values
are torch CUDA tensors, handled exactly as in the torch backend (`Rank`: per-rank device and
stream, numpy inputs converted once, logits returned as numpy, `DeviceCollectives` between ranks).
Each call sets the input shapes and addresses, allocates the outputs at the shapes TensorRT infers
(`get_tensor_shape`) and enqueues `execute_async_v3` on the rank's stream; nothing synchronises
the host. The KV cache is the ONNX form (`present` = past ++ new, a fresh tensor per step).

Not here: CUDA graphs around plans, one activation buffer shared by a rank's contexts (each
context owns its own), multiple optimization profiles.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cqil.errors import CqilError
from cqil.exporters.tensorrt import check_plan_compatibility, require_tensorrt
from cqil.runtime.backends.torch_backend import Rank, parse_devices, rank_state

_RUNTIME = {}  # one trt.Runtime per process; it must outlive the engines it deserialized


def torch_dtype(trt, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    for name, t in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return t
    raise CqilError(f"tensorrt: tensor type {dtype} has no torch equivalent here")


class TrtSegment:
    def __init__(self, rank: Rank, trt, plan, rec: dict, path: Path):
        self.rank, self.plan = rank, plan
        self.context = plan.create_execution_context()
        if self.context is None:
            raise CqilError(f"engine: cannot create an execution context for {path.name} (out of GPU memory?)")
        self.inputs = [t["name"] for t in rec["inputs"]]
        self.outputs = [t["name"] for t in rec["outputs"]]
        io = [plan.get_tensor_name(i) for i in range(plan.num_io_tensors)]
        ins = [n for n in io if plan.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in io if plan.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(ins) != sorted(self.inputs) or sorted(outs) != sorted(self.outputs):
            raise CqilError(f"engine: {path.name} has inputs {ins} / outputs {outs}, the manifest says "
                            f"{self.inputs} / {self.outputs}")
        self.dtypes = {n: torch_dtype(trt, plan.get_tensor_dtype(n)) for n in io}
        self.weight_bytes = rec.get("weight_bytes", 0)
        self._empty = torch.empty(256, dtype=torch.uint8, device=rank.device)  # address for 0-size tensors

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._empty.data_ptr()

    def __call__(self, env: dict) -> None:
        r, ctx = self.rank, self.context
        with r.on_stream():
            feeds = []  # kept alive until the work is queued; the stream orders any reuse after it
            for name in self.inputs:
                t = r.tensor(env, name, self.dtypes[name]).contiguous()
                feeds.append(t)
                if tuple(ctx.get_tensor_shape(name)) != tuple(t.shape) and not ctx.set_input_shape(name, tuple(t.shape)):
                    raise CqilError(f"engine: rank {r.rank}: {name} of shape {tuple(t.shape)} is outside the "
                                    f"plan's optimization profile (recompile with a larger --max-batch / --max-seq-len)")
                ctx.set_tensor_address(name, self._address(t))
            results = {}
            for name in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise CqilError(f"engine: rank {r.rank}: TensorRT cannot infer the shape of {name} ({shape})")
                out = torch.empty(shape, dtype=self.dtypes[name], device=r.device)
                ctx.set_tensor_address(name, self._address(out))
                results[name] = out
            if not ctx.execute_async_v3(torch.cuda.current_stream(r.device).cuda_stream):
                raise CqilError(f"engine: rank {r.rank}: TensorRT execution failed (see its log)")
            for name, value in results.items():
                env[name] = r.publish(name, value)


def open_segment(engine, rank: int, rec: dict, devices=None, threads=None, providers=None, spin=True) -> TrtSegment:
    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise CqilError("engine: the tensorrt backend needs a CUDA GPU, and torch sees none")
    device = parse_devices(devices or "cuda", engine.ranks)[rank]
    if device.type != "cuda":
        raise CqilError(f"engine: the tensorrt backend runs on CUDA devices, rank {rank} was given {device}")
    check_plan_compatibility(engine.manifest.get("tensorrt"), trt.__version__, torch.cuda.get_device_capability(device))
    if "plan" not in rec:
        raise CqilError(f"engine: rank{rank}/{rec['name']} has no TensorRT plan; recompile with --backend tensorrt")
    from cqil.compiler.loader import parse_dtype

    state = rank_state(engine, rank, device, parse_dtype(engine.manifest["dtype"]), decode="eager")
    if "runtime" not in _RUNTIME:
        _RUNTIME["logger"] = trt.Logger(trt.Logger.WARNING)
        _RUNTIME["runtime"] = trt.Runtime(_RUNTIME["logger"])
    path = engine.dir / rec["plan"]
    with torch.cuda.device(device):
        plan = _RUNTIME["runtime"].deserialize_cuda_engine(path.read_bytes())
        if plan is None:
            raise CqilError(f"engine: TensorRT cannot deserialize {rec['plan']} (see its log)")
        return TrtSegment(state, trt, plan, rec, path)
