"""The PyTorch backend: run the segments with torch on each rank's device (CPU or CUDA).

    engine = cqil.load("engine_dir", backend="torch", devices=["cuda:0", "cuda:1"])

Needs an engine compiled with `--formats onnx,torch`. At load time every rank rebuilds its segments
from the manifest (config + plan -> meta model -> trace -> CQIL passes -> partition, exactly as the
compiler did), checks that their input/output names equal the manifest's, and materializes only its
own weights from `rank{r}/weights.safetensors`, straight onto its device.

What happens on each rank (`Rank`):

- Values are torch tensors. The Engine hands in numpy (ids, mask, positions, an empty cache):
  each is converted once per step, on first use, and written back into the rank's environment.
  `logits` go out as float32 numpy: the one host synchronisation of a step, which sampling needs.
- KV cache: one preallocated `[B, kv_heads, capacity, head_dim]` buffer pair per layer, written in
  place at the step's position; `present.*` outputs are views of its valid prefix, so the Engine's
  cache handling is unchanged. Capacity grows in powers of two up to the engine's max_seq_len.
- Decode (one new token) has three forms (`decode=`): "eager" attends over the valid prefix only;
  "static" writes at a device-side slot and attends over the whole buffer with the padded mask, so
  every shape is fixed; "graph" (CUDA only, the default there) captures "static" per segment as a
  CUDA graph on the first decode step and replays it afterwards.
- CUDA: each rank has its own stream; every segment call and collective runs on it. Collectives
  between rank threads (`DeviceCollectives`) record an event on the producer's stream and make the
  consumer's stream wait on it; a value on another device is copied to the consumer's device, and
  the sum is taken there, in rank order. No host synchronisation except for the logits.

Not here: NCCL. In one process the ranks already share memory, so a collective is a cross-stream
(or peer) copy plus an add; NCCL group calls would only pay off for a one-process multi-GPU setup
with large activations, and multi-process runs use torch.distributed (`cqil.runtime.launch`).
`threads` / `providers` (ONNX Runtime options the Engine always passes) are ignored.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from cqil.compiler.model import Attention
from cqil.errors import CqilError

DECODE_MODES = ("auto", "eager", "static", "graph")
_STEP = "cqil.step"  # key of the per-step record in a rank's environment
_RANKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> {rank: Rank}
_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in the process


def parse_devices(devices, ranks: list[int]) -> dict[int, torch.device]:
    """`None` (CUDA if available, else CPU), one device for all ranks, or one per rank.

    A bare "cuda" spreads the ranks over the visible GPUs (rank r on cuda:{r % count}).
    """
    if devices is None:
        devices = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(devices, (str, torch.device)):
        devices = [devices] * len(ranks)
    devices = list(devices)
    if len(devices) <= max(ranks):
        raise CqilError(f"torch backend: {len(devices)} device(s) given, rank {max(ranks)} needs one (one per rank)")
    out = {}
    for r in ranks:
        try:
            d = torch.device(devices[r])
        except (RuntimeError, TypeError) as e:
            raise CqilError(f"torch backend: bad device {devices[r]!r} for rank {r} ({e})") from None
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise CqilError(f"torch backend: rank {r} asks for {d}, but torch sees no CUDA device")
            d = torch.device("cuda", r % torch.cuda.device_count() if d.index is None else d.index)
            if d.index >= torch.cuda.device_count():
                raise CqilError(f"torch backend: rank {r} asks for {d}, but only {torch.cuda.device_count()} "
                                f"CUDA device(s) are visible")
        elif d.type != "cpu":
            raise CqilError(f"torch backend: device {d} is not supported (use cpu or cuda)")
        out[r] = d
    if len({d.type for d in out.values()}) > 1:
        raise CqilError(f"torch backend: ranks mix CPU and CUDA devices ({[str(d) for d in out.values()]}); "
                        f"put every rank on CUDA or every rank on CPU")
    return out


@dataclass
class StepInfo:
    mode: str  # "eager", "static" or "graph"
    batch: int
    past: int  # P: cached tokens before this step
    new: int  # T: tokens in this step


class Rank:
    """One rank's device, stream, KV buffers and per-step state (shared by its segments)."""

    def __init__(self, engine, rank: int, device: torch.device, dtype: torch.dtype, decode: str):
        self.rank, self.device, self.dtype = rank, device, dtype
        self.max_seq_len = engine.max_seq_len
        self.kv_layers = list(engine.kv_layers[rank])
        cfg = engine.config
        self.kv_shape = (cfg.num_kv_heads, cfg.head_dim)
        cuda = device.type == "cuda"
        if decode == "auto":
            decode = "graph" if cuda else "eager"
        if decode not in DECODE_MODES[1:]:
            raise CqilError(f"torch backend: decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        if decode == "graph" and not cuda:
            raise CqilError(f"torch backend: decode='graph' needs a CUDA device, rank {rank} is on {device}")
        self.decode = decode
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        # what this rank sends to others: graph outputs among these are copied before they leave
        self.sent = {s.inputs[0] for s in engine.programs[rank]
                     if s.kind != "segment" and (s.kind != "broadcast" or rank == 0)}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.capacity = 0
        self.batch = 0
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)  # write position in static decode
        self.static_inputs: dict[str, torch.Tensor] = {}
        self.graphs: dict[str, "_Graph"] = {}
        self.pool = None
        self.step: StepInfo | None = None
        self.graph_error: str | None = None  # why decode fell back from "graph" to "static"

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    # -- values -------------------------------------------------------------------------------

    def tensor(self, env: dict, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """env[name] as a tensor on this rank's device (converted once, then stored back)."""
        value = env[name]
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
            if self.stream is not None and value.numel():
                value = value.pin_memory()  # from pageable memory the driver may wait for the stream
        if value.device != self.device or (dtype is not None and value.dtype != dtype):
            value = value.to(self.device, dtype=dtype, non_blocking=True)
        if env[name] is not value:
            env[name] = value
        return value

    def publish(self, name: str, value: torch.Tensor):
        """A segment output as the environment should hold it."""
        if name == "logits":  # sampling runs on the host: the step's one synchronisation
            return value.float().cpu().numpy()
        step = self.step  # None under the tensorrt backend, whose values are always fresh tensors
        if step is None:
            return value
        if step.mode != "eager" and name.startswith("present."):
            return value[:, :, :step.past + step.new]
        if step.mode == "graph" and name in self.sent:
            return value.clone()  # graph memory is rewritten by the next replay; the consumer may lag
        return value

    # -- the KV cache and the step ------------------------------------------------------------

    def _capacity_for(self, total: int) -> int:
        cap = max(64, self.capacity)
        while cap < total:
            cap *= 2
        return min(cap, self.max_seq_len)

    def _is_own(self, past, layer: int, batch: int, length: int) -> bool:
        buf = self.keys.get(layer)
        return (isinstance(past, torch.Tensor) and buf is not None and past.device == buf.device
                and past.data_ptr() == buf.data_ptr() and past.shape[0] == batch and past.shape[2] == length
                and past.stride() == buf.stride())

    def begin_step(self, env: dict) -> StepInfo:
        """Once per rank and step: size the cache, adopt the given past, choose the decode form."""
        step = env.get(_STEP)
        if step is not None:
            self.step = step
            return step
        B, T = env["input_ids"].shape
        total = env["attention_mask"].shape[1]
        P = total - T
        if total > self.max_seq_len:
            raise CqilError(f"rank {self.rank}: {total} tokens exceed the engine's max_seq_len {self.max_seq_len}")
        need_new = B != self.batch or total > self.capacity
        if need_new:
            self.capacity, self.batch = self._capacity_for(total), B
            self.graphs.clear()  # captured graphs point at the old buffers
            self.static_inputs = {}
        kv_heads, head_dim = self.kv_shape
        for l in self.kv_layers:
            own = not need_new and self._is_own(env[f"past_key_values.{l}.key"], l, B, P)
            for kind, bufs in (("key", self.keys), ("value", self.values)):
                if need_new:
                    bufs[l] = torch.zeros((B, kv_heads, self.capacity, head_dim), dtype=self.dtype, device=self.device)
                if P > 0 and not own:  # a cache from elsewhere (or the outgrown buffer): copy it in
                    bufs[l][:, :, :P].copy_(self.tensor(env, f"past_key_values.{l}.{kind}", self.dtype))
        mode = self.decode if T == 1 and P > 0 else "eager"
        if mode != "eager":
            self._set_static_inputs(env, B, P)
        step = env[_STEP] = self.step = StepInfo(mode, B, P, T)
        return step

    def _set_static_inputs(self, env: dict, B: int, P: int):
        """Fixed-shape model inputs for static decode; the mask is padded to the cache capacity."""
        s = self.static_inputs
        if not s:
            s["input_ids"] = torch.zeros((B, 1), dtype=torch.int64, device=self.device)
            s["position_ids"] = torch.zeros((B, 1), dtype=torch.int64, device=self.device)
            s["attention_mask"] = torch.zeros((B, self.capacity), dtype=torch.int64, device=self.device)
        for name in ("input_ids", "position_ids"):
            s[name].copy_(self.tensor(env, name, torch.int64), non_blocking=True)
        mask = s["attention_mask"]
        mask[:, P + 1:].zero_()
        mask[:, :P + 1].copy_(self.tensor(env, "attention_mask", torch.int64), non_blocking=True)
        self.slot.fill_(P)
        env.update(s)


class CachedAttention(Attention):
    """`Attention` over the rank's preallocated KV buffers (installed on rebuilt modules).

    Only `append_kv` differs from `Attention`: the new keys/values are written
    into the buffer instead of concatenated, and the returned present is the buffer itself (static)
    or a view of its valid prefix (eager).
    """

    rank_state: Rank
    layer: int

    def append_kv(self, past_key, past_value, k, v):
        rank = self.rank_state
        key, value = rank.keys[self.layer], rank.values[self.layer]  # [B, kvh, C, hd]
        if rank.step.mode == "eager":
            P, T = rank.step.past, k.shape[2]
            key[:, :, P:P + T] = k
            value[:, :, P:P + T] = v
            return key[:, :, :P + T], value[:, :, :P + T]  # [B, kvh, P+T, hd]
        # fixed shapes: the position lives on the device, the mask hides the unused tail
        key.index_copy_(2, rank.slot, k)
        value.index_copy_(2, rank.slot, v)
        return key, value


class _Graph:
    """One segment's static decode, captured as a CUDA graph with static input buffers."""

    def __init__(self, gm, args: list[torch.Tensor], keep: set[int], pool):
        # keep: argument positions whose tensors are already fixed (rank inputs, KV buffers)
        self.inputs = [a if i in keep else a.clone() for i, a in enumerate(args)]
        self.graph = torch.cuda.CUDAGraph()
        with _CAPTURE_LOCK:
            # thread_local: the other ranks' threads keep running CUDA work during the capture
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.outputs = gm(*self.inputs)
            finally:
                self.graph.capture_end()

    def __call__(self, args):
        for buf, a in zip(self.inputs, args):
            if buf is not a:
                buf.copy_(a, non_blocking=True)
        self.graph.replay()
        return self.outputs


class TorchSegment:
    def __init__(self, rank: Rank, seg, rec: dict):
        self.rank, self.gm, self.name = rank, seg.gm, seg.name
        self.inputs, self.outputs = list(seg.inputs), list(seg.outputs)
        params = {id(p): p for p in seg.gm.parameters()}.values()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params)
        self.dtypes = {t["name"]: getattr(torch, t["dtype"]) for t in rec["inputs"]}

    def _args(self, env: dict, step: StepInfo) -> list[torch.Tensor]:
        r = self.rank
        args = []
        for n in self.inputs:
            if n.startswith("past_key_values."):  # begin_step has put the past in the buffers
                layer, kind = n.split(".")[1:]
                args.append((r.keys if kind == "key" else r.values)[int(layer)])
            else:
                args.append(r.tensor(env, n, self.dtypes[n]))
        return args

    def __call__(self, env: dict) -> None:
        r = self.rank
        with r.on_stream(), torch.no_grad():
            step = r.begin_step(env)
            args = self._args(env, step)
            if step.mode == "graph":
                graph = r.graphs.get(self.name)
                if graph is None:
                    outs = self.gm(*args)  # this step runs eagerly (warm-up), later steps replay
                    keep = {i for i, a in enumerate(args)
                            if any(a is b for b in (*r.static_inputs.values(), *r.keys.values(), *r.values.values()))}
                    if r.pool is None:
                        r.pool = torch.cuda.graph_pool_handle()
                    try:
                        r.graphs[self.name] = _Graph(self.gm, args, keep, r.pool)
                    except Exception as e:  # the static form still runs, just without the graph
                        r.decode, r.graph_error = "static", f"{type(e).__name__}: {e}"
                        r.graphs.clear()
                        warnings.warn(f"rank {r.rank}: CUDA graph capture of {self.name} failed ({r.graph_error}); "
                                      f"decoding without graphs")
                else:
                    outs = graph(args)
            else:
                outs = self.gm(*args)
            for name, value in zip(self.outputs, outs):
                env[name] = r.publish(name, value)


# -- opening ----------------------------------------------------------------------------------

class _Loaded:
    """A rank's rebuilt segments with its weights on its device."""

    def __init__(self, engine, rank: int, devices=None, decode: str = "auto"):
        from cqil.compiler.loader import build_meta_model, parse_dtype
        from cqil.compiler.pipeline import build_graph
        from cqil.passes.partition import MAX_SEGMENT_BYTES, partition

        info = next(r for r in engine.manifest["ranks"] if r["rank"] == rank)
        if "weights" not in info:
            raise CqilError(f"engine: {engine.dir} has no torch weights for rank {rank}; "
                            f"recompile with --formats onnx,torch")
        device = parse_devices(devices, engine.ranks)[rank]
        dtype = parse_dtype(engine.manifest["dtype"])
        self.rank = rank_state(engine, rank, device, dtype, decode)
        model = build_meta_model(engine.config, engine.max_seq_len, dtype)
        gm = build_graph(model, engine.plan)
        # cut exactly as the compile did; manifests before "max_segment_bytes" used the default cap or none
        caps = [engine.manifest["max_segment_bytes"]] if "max_segment_bytes" in engine.manifest else [MAX_SEGMENT_BYTES, None]
        for cap in caps:
            segments = partition(gm, max_segment_bytes=cap).segments.get(rank, [])
            if [s.name for s in segments] == [r["name"] for r in info["segments"]]:
                break
        _check_interface(segments, info, rank)
        _load_weights(engine.dir / info["weights"]["file"], segments, model, device, dtype,
                      engine.config.tie_word_embeddings)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[name] = buf.to(device)  # rope frequencies, kept in fp32
            if isinstance(module, Attention):
                module.__class__ = CachedAttention
                module.rank_state = self.rank
        for name, module in model.named_modules():
            if isinstance(module, CachedAttention):
                module.layer = int(name.split(".")[2])  # model.layers.{l}.self_attn
        self.segments = {s.name: TorchSegment(self.rank, s, rec) for s, rec in zip(segments, info["segments"])}


def rank_state(engine, rank: int, device=None, dtype=None, decode: str = "auto") -> Rank:
    """The engine's `Rank` for `rank`, created on first request (by whichever backend opens it)."""
    ranks = _RANKS.setdefault(engine, {})
    if rank not in ranks:
        if device is None:
            raise CqilError(f"engine: rank {rank} has no device yet (open its segments first)")
        ranks[rank] = Rank(engine, rank, device, dtype, decode)
    return ranks[rank]


def _check_interface(segments, info: dict, rank: int):
    recs = info["segments"]
    if [s.name for s in segments] != [r["name"] for r in recs]:
        raise CqilError(f"engine: rank {rank} rebuilds segments {[s.name for s in segments]}, the manifest "
                        f"lists {[r['name'] for r in recs]}; the engine was built by another cqil: recompile it")
    for seg, rec in zip(segments, recs):
        want_in, want_out = [t["name"] for t in rec["inputs"]], [t["name"] for t in rec["outputs"]]
        if seg.inputs != want_in or seg.outputs != want_out:
            raise CqilError(f"engine: rank{rank}/{seg.name} rebuilds with inputs {seg.inputs} / outputs {seg.outputs}, "
                            f"the manifest says {want_in} / {want_out}; recompile the engine with this cqil")


def _load_weights(path, segments, model, device, dtype, tied: bool):
    from safetensors import safe_open
    from torch import nn

    from cqil.compiler.loader import param_names
    from cqil.exporters.torch_weights import stored_name

    names = list(dict.fromkeys(n for s in segments for n in param_names(s.gm)))
    loaded: dict[str, nn.Parameter] = {}
    try:
        f = safe_open(str(path), framework="pt", device=str(device))
    except Exception as e:
        raise CqilError(f"engine: cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    available = set(f.keys())
    for name in names:
        source = stored_name(name, tied)
        if source not in available:
            raise CqilError(f"engine: {path} lacks tensor {source}, which rank segments use")
        if source not in loaded:
            t = f.get_tensor(source)
            expected = model.get_parameter(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(expected.shape):
                raise CqilError(f"engine: {path}: {source} is {t.dtype} {tuple(t.shape)}, the manifest implies "
                                f"{dtype} {tuple(expected.shape)}")
            loaded[source] = nn.Parameter(t, requires_grad=False)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = loaded[source]


_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> {rank: _Loaded}


def open_segment(engine, rank: int, rec: dict, devices=None, decode: str = "auto", threads=None,
                 providers=None, spin=True) -> TorchSegment:
    """Open one segment; the rank's model is rebuilt and loaded once, on its first segment."""
    cache = _LOADED.setdefault(engine, {})
    if rank not in cache:
        cache[rank] = _Loaded(engine, rank, devices=devices, decode=decode)
    segments = cache[rank].segments
    if rec["name"] not in segments:
        raise CqilError(f"engine: rank {rank} has no segment {rec['name']!r} after rebuilding")
    return segments[rec["name"]]
