"""The ONNX Runtime backend: one InferenceSession per segment, on the CPU or on a rank's CUDA device.

    engine = cqil.load("engine_dir")                                        # CPU, numpy values
    engine = cqil.load("engine_dir", devices="cuda")                        # rank r on cuda:{r % GPUs}
    engine = cqil.load("engine_dir", devices=["cuda:0", "cuda:1"], tensorrt_ep=True)

Options: `devices` (cpu, cuda, or one per rank; see `cqil.runtime.backends.device.parse_devices`),
`io_binding` (default on), `tensorrt_ep` (CUDA: put ONNX Runtime's TensorRT execution provider
before its CUDA one).

IO binding: every output is allocated by cqil at the shape the manifest gives (its named axes
filled in from the step) and bound before the run, so ONNX Runtime writes straight into it; inputs
are bound where they lie. A segment keeps its binding from step to step and binds again only the
values that are new objects (`OrtSegment._bind_step`). Engines compiled with fused operators (GroupQueryAttention, see
cqil.exporters.fuse) keep the KV cache in one buffer per layer (`BufferCache`), bound as both the
past input and the present output: a decode step writes one position, whatever the context length;
a step of several new tokens after a past at batch > 1, which that op refuses, runs row by row
(`OrtSegment.rows`). On the CPU values are numpy arrays; bit for bit the same as `session.run`,
minus a copy of every output. On CUDA values are torch tensors on the rank's
device: the sessions run on the rank's torch stream (`user_compute_stream`), activations and the
KV cache stay on the device between steps and segments, and collectives between the rank threads
are device-to-device (`DeviceCollectives`). Without a CUDA torch (an onnxruntime-gpu next to a
CPU-only torch) values stay numpy: outputs are bound to host memory and collectives run on the host.

Thread pools: each session gets the intra-op threads the Engine assigns its segment; with several
ranks in one process, idle pool threads do not spin (spinning pools steal the cores the other
ranks compute on).
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np

from cqil.errors import CqilError, first_line
from cqil.runtime.collectives import LocalCollectives
from cqil.runtime.kv_cache import BufferCache, ConcatCache
from cqil.runtime.spec import NUMPY_DTYPES

OPTIONS = frozenset({"devices", "io_binding", "tensorrt_ep"})
GPU_EXTRA = "pip install -e '.[gpu]' (onnxruntime-gpu)"


def step_dims(env: dict) -> dict[str, int]:
    """The named axes' sizes in this step."""
    (B, T), total = env["input_ids"].shape, env["attention_mask"].shape[1]
    return {"batch": B, "sequence": T, "past_sequence": total - T, "total_sequence": total}


class OrtSegment:
    def __init__(self, rank, session, rec: dict):
        self.rank, self.session, self.file = rank, session, rec["files"][0]
        self.inputs = [t["name"] for t in rec["inputs"]]
        self.outputs = [t["name"] for t in rec["outputs"]]
        # a present written into its past's buffer (BufferCache) is bound to that buffer
        self.in_place = {o: "past_key_values." + o.removeprefix("present.") for o in self.outputs
                         if rank.buffered_kv and o.startswith("present.")}
        self.out_specs = [(t["name"], t["dtype"], t["shape"]) for t in rec["outputs"] if t["name"] not in self.in_place]
        self.weight_bytes = rec.get("weight_bytes", 0)
        # ONNX Runtime's GroupQueryAttention takes several new tokens after a past only at batch 1
        self.by_row = rank.fused and any(o.startswith("present.") for o in self.outputs)
        self.batched = {t["name"] for t in rec["inputs"] + rec["outputs"] if t["shape"][:1] == ["batch"]}
        self._binding, self._bound = None, {}  # see _bind_step

    def rows(self, dims: dict) -> list:
        """The batch slices to run this step as: all rows at once, or (fused attention, several new
        tokens after a past, batch > 1) one row at a time; the rows of a step are independent."""
        if self.by_row and dims["batch"] > 1 and dims["sequence"] > 1 and dims["past_sequence"] > 0:
            return [slice(b, b + 1) for b in range(dims["batch"])]
        return [slice(None)]

    def _part(self, name: str, value, rows: slice):
        return value[rows] if name in self.batched else value

    def __call__(self, env: dict) -> None:
        r, dims = self.rank, step_dims(env)
        rows = self.rows(dims)
        if not r.io_binding:
            parts = [self._run(self.session.run, self.outputs, {n: self._part(n, env[n], b) for n in self.inputs})
                     for b in rows]
            env.update((name, parts[0][i] if len(parts) == 1 or name not in self.batched
                        else np.concatenate([p[i] for p in parts]))
                       for i, name in enumerate(self.outputs))
            return
        with r.on_stream():  # CUDA: conversions and allocations on the stream the session runs on
            outs = {name: r.empty([dims.get(d, d) for d in shape], dtype) for name, dtype, shape in self.out_specs}
            outs.update((name, env[past]) for name, past in self.in_place.items())
            for name in self.inputs:
                r.prepare_input(env, name)
            if len(rows) == 1:
                self._run(self.session.run_with_iobinding, self._bind_step(env, outs))
            else:
                for b in rows:  # every row writes its part of the same output buffers
                    binding = self.session.io_binding()
                    for name in self.inputs:
                        r.bind_input(binding, name, self._part(name, env[name], b))
                    for name, value in outs.items():
                        r.bind_output(binding, name, self._part(name, value, b))
                    self._run(self.session.run_with_iobinding, binding)
            for name, value in outs.items():
                env[name] = r.publish(name, value)

    def _bind_step(self, env: dict, outs: dict):
        """The segment's binding with this step's values: one binding kept from step to step, a name
        rebound only where its value is another object (decode steps keep their KV buffers, so only
        the ids, the mask, the positions and the fresh outputs are bound again). Values are never
        changed in shape or moved in place, so the same object is the same memory."""
        r = self.rank
        if self._binding is None:
            self._binding, self._bound = self.session.io_binding(), {}
        for names, values, bind in ((self.inputs, env, r.bind_input), (outs, outs, r.bind_output)):
            for name in names:
                value, bound = values[name], self._bound.get(name)
                if bound is None or bound() is not value:  # a weak reference: the binding keeps nothing alive
                    bind(self._binding, name, value)
                    self._bound[name] = weakref.ref(value)
        return self._binding

    def _run(self, run, *args):
        try:
            return run(*args)
        except Exception as e:  # ONNX Runtime's Fail / InvalidArgument / RuntimeException: a damaged engine
            raise CqilError(f"engine: {self.file} failed: {first_line(e)}") from None


def open_session(path, rec: dict, threads: int, spin: bool, providers) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:
        raise CqilError(f"engine: cannot load {rec['files'][0]}: {first_line(e)}") from None
    want_in, want_out = [t["name"] for t in rec["inputs"]], [t["name"] for t in rec["outputs"]]
    got_in, got_out = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        unknown = sorted(set(got_in + got_out) - set(want_in + want_out)) or sorted(set(want_in + want_out) - set(got_in + got_out))
        raise CqilError(f"engine: {rec['files'][0]} does not match the manifest: unknown tensor name(s) {unknown}")
    return session


class OrtRank:
    """A rank on the CPU: numpy values."""

    device_type, device_index = "cpu", 0

    def __init__(self, spec, rank: int, threads, ranks_in_process: int, io_binding: bool = True):
        self.rank, self.io_binding = rank, io_binding
        self._kv(spec)
        self.segments = self._open(spec, threads, ranks_in_process == 1)

    def _kv(self, spec):
        self.kv_layers = spec.kv_layers(self.rank)
        self.max_seq_len = spec.max_seq_len
        self._kv_shape = (spec.config.num_kv_heads, 0, spec.config.head_dim)
        self._kv_dtype = spec.float_dtype
        # fused attention writes into the past's own buffer when present and past are bound to it
        self.fused = bool(spec.manifest.get("fused"))
        self.buffered_kv = self.io_binding and self.fused

    def providers(self) -> list:
        return ["CPUExecutionProvider"]

    def on_stream(self):
        return contextlib.nullcontext()

    def _open(self, spec, threads, spin: bool) -> dict[str, OrtSegment]:
        providers = self.providers()
        return {rec["name"]: OrtSegment(self, open_session(spec.dir / rec["files"][0], rec, threads(rec), spin,
                                                           providers), rec)
                for rec in spec.segments(self.rank)}

    # -- values: numpy --------------------------------------------------------------------------

    def empty(self, shape, dtype: str):
        return np.empty(shape, NUMPY_DTYPES[dtype])

    def prepare_input(self, env: dict, name: str):
        """env[name] as the session can read it in place (stored back)."""
        if not env[name].flags.c_contiguous:
            env[name] = np.ascontiguousarray(env[name])

    def bind_input(self, binding, name: str, value: np.ndarray):
        binding.bind_cpu_input(name, value)

    def bind_output(self, binding, name: str, value: np.ndarray):
        binding.bind_output(name, self.device_type, self.device_index, value.dtype, value.shape, value.ctypes.data)

    def publish(self, name: str, value):
        return value

    def new_cache(self, batch: int):
        if self.buffered_kv:
            return BufferCache(self.kv_layers, batch, self.empty_kv, self.max_seq_len)
        return ConcatCache(self.kv_layers, self.empty_kv(batch, 0))

    def empty_kv(self, batch: int, length: int):
        """A zeroed KV array [batch, kv_heads, length, head_dim] of this rank's kind."""
        kvh, _, hd = self._kv_shape
        return np.zeros((batch, kvh, length, hd), self._kv_dtype)

    def close(self):
        self.segments = {}  # sessions are freed with their last reference


class OrtHostCudaRank(OrtRank):
    """A rank whose sessions run on CUDA while torch has no CUDA: host values, ORT copies in and out."""

    device_type = "cpu"

    def __init__(self, spec, rank, threads, ranks_in_process, device_index: int, io_binding: bool = True,
                 tensorrt_ep: bool = False):
        self.cuda_index, self.tensorrt_ep = device_index, tensorrt_ep
        super().__init__(spec, rank, threads, ranks_in_process, io_binding)

    def _kv(self, spec):
        super()._kv(spec)
        self.buffered_kv = False  # host buffers are copied to the device and back: nothing is written in place

    def providers(self) -> list:
        return cuda_providers(self.cuda_index, self.tensorrt_ep)


def cuda_providers(index: int, tensorrt_ep: bool, stream: int | None = None) -> list:
    cuda = {"device_id": index}
    if stream is not None:  # run on the rank's torch stream: ordered with its collectives' events
        cuda.update(has_user_compute_stream="1", user_compute_stream=str(stream))
    providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    if tensorrt_ep:
        providers.insert(0, ("TensorrtExecutionProvider", {"device_id": index}))
    return providers


def _torch_rank_class():
    """OrtRank with torch tensors on a CUDA device (defined on demand: the CPU path needs no torch)."""
    import torch

    from cqil.runtime.backends.device import DeviceRank

    to_torch = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "bool": torch.bool}
    element_type = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                    torch.bool: np.bool_, torch.bfloat16: 16}  # 16 = onnx.TensorProto.BFLOAT16

    class OrtCudaRank(DeviceRank, OrtRank):
        device_type = "cuda"

        def __init__(self, spec, rank, threads, ranks_in_process, device, io_binding=True, tensorrt_ep=False):
            DeviceRank.__init__(self, rank, device, to_torch[spec.dtype])
            self.device_index, self.tensorrt_ep = device.index, tensorrt_ep
            self.io_binding = True  # device values need bound buffers
            self._kv(spec)
            self._dtypes = {t["name"]: to_torch[t["dtype"]] for rec in spec.segments(rank) for t in rec["inputs"]}
            self._nowhere = None  # an address for 0-size tensors (made on first need)
            self.segments = self._open(spec, threads, ranks_in_process == 1)

        def providers(self) -> list:
            return cuda_providers(self.device_index, self.tensorrt_ep, self.stream.cuda_stream)

        def empty(self, shape, dtype: str):
            return torch.empty(shape, dtype=to_torch[dtype], device=self.device)

        def _address(self, t) -> int:
            if t.numel():
                return t.data_ptr()
            if self._nowhere is None:
                self._nowhere = torch.empty(256, dtype=torch.uint8, device=self.device)
            return self._nowhere.data_ptr()

        def prepare_input(self, env: dict, name: str):
            if not self.tensor(env, name, self._dtypes[name]).is_contiguous():
                env[name] = env[name].contiguous()

        def bind_input(self, binding, name: str, t):
            binding.bind_input(name, "cuda", self.device_index, element_type[t.dtype], tuple(t.shape), self._address(t))

        def bind_output(self, binding, name: str, value):
            binding.bind_output(name, "cuda", self.device_index, element_type[value.dtype], tuple(value.shape),
                                self._address(value))

        def empty_kv(self, batch: int, length: int):
            kvh, _, hd = self._kv_shape
            return torch.zeros((batch, kvh, length, hd), dtype=self.dtype, device=self.device)

    return OrtCudaRank


def open_rank(spec, rank: int, threads, ranks_in_process: int, devices=None, io_binding: bool = True,
              tensorrt_ep: bool = False):
    wanted = devices if isinstance(devices, str) else ",".join(map(str, devices or ["cpu"]))
    if all(d.strip() == "cpu" for d in wanted.split(",")):
        if tensorrt_ep:
            raise CqilError("onnxruntime backend: tensorrt_ep needs CUDA devices (--devices cuda)")
        return OrtRank(spec, rank, threads, ranks_in_process, io_binding)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise CqilError(f"onnxruntime backend: this onnxruntime ({ort.__version__}) has no CUDA execution provider; "
                        f"{GPU_EXTRA}, or use --backend torch")
    if tensorrt_ep and "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise CqilError("onnxruntime backend: this onnxruntime has no TensorRT execution provider (it needs "
                        "TensorRT's libraries on the library path)")
    import torch

    if not torch.cuda.is_available():  # host fallback: the device index is taken as written
        index = _cuda_index(wanted, rank)
        return OrtHostCudaRank(spec, rank, threads, ranks_in_process, index, io_binding, tensorrt_ep)
    from cqil.runtime.backends.device import parse_devices

    device = parse_devices(devices, spec.ranks)[rank]
    return _torch_rank_class()(spec, rank, threads, ranks_in_process, device, io_binding, tensorrt_ep)


def _cuda_index(devices: str, rank: int) -> int:
    parts = [d.strip() for d in devices.split(",")]
    d = parts[rank] if len(parts) > 1 else parts[0]
    if d == "cuda":
        return rank
    if not d.startswith("cuda:") or not d[5:].isdigit():
        raise CqilError(f"devices: {d!r} (rank {rank}) is not a device: use cpu, cuda or cuda:N")
    return int(d[5:])


def local_collectives(runners, timeout):
    ranks = list(runners.values())
    if all(getattr(r, "stream", None) is None for r in ranks):  # numpy values: on the host
        return LocalCollectives(len(ranks), timeout=timeout)
    from cqil.runtime.backends.device_collectives import DeviceCollectives

    return DeviceCollectives([r.device for r in ranks], [r.stream for r in ranks], timeout)
