"""The PyTorch backend: run the segments with torch on each rank's device (CPU or CUDA).

    engine = cqil.load("engine_dir", backend="torch", devices=["cuda:0", "cuda:1"])

Options: `devices` (see `parse_devices`), `decode` ("auto", "eager", "static", "graph").

Needs an engine compiled with `--formats onnx,torch`. At load time every rank rebuilds its segments
from the manifest (config + plan -> meta model -> trace -> CQIL passes -> partition, exactly as the
compiler did), checks that their input/output names equal the manifest's, and materializes only its
own weights from `rank{r}/weights.safetensors`, straight onto its device.

What happens on each rank (`TorchRank`):

- Values are torch tensors. The Engine hands in numpy (ids, mask, positions): each is converted
  once per step, on first use, and written back into the rank's environment. `logits` go out as
  float32 numpy: the one host synchronisation of a step, which sampling needs.
- KV cache (`TorchCache`, one per Generator): one preallocated `[B, kv_heads, capacity, head_dim]`
  buffer pair per layer, written in place at the step's position by the `LayerCache` object each
  rebuilt `Attention` holds; `present.*` outputs are views of its valid prefix. Capacity grows in
  powers of two up to the engine's max_seq_len.
- Decode (one new token) has three forms (`decode=`): "eager" attends over the valid prefix only;
  "static" writes at a device-side slot and attends over the whole buffer with the padded mask, so
  every shape is fixed; "graph" (CUDA only, the default there) captures "static" per segment as a
  CUDA graph on the first decode step of a cache and replays it afterwards. Graphs belong to the
  cache whose buffers they read; when its buffers are replaced they are dropped with their memory
  pool, and the next capture takes a fresh pool.
- CUDA: each rank has its own stream; every segment call and collective runs on it. Collectives
  between rank threads (`DeviceCollectives`) record an event on the producer's stream and make the
  consumer's stream wait on it; a value on another device is copied to the consumer's device, and
  the sum is taken there, in rank order. No host synchronisation except for the logits.

Not here: NCCL. In one process the ranks already share memory, so a collective is a cross-stream
(or peer) copy plus an add; multi-process runs use torch.distributed (`cqil.runtime.launch`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from cqil.errors import CqilError, first_line
from cqil.model.model import Attention
from cqil.program import present_name
from cqil.runtime.backends.device import DeviceRank, parse_devices

OPTIONS = frozenset({"devices", "decode"})
DECODE_MODES = ("auto", "eager", "static", "graph")
_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in the process


@dataclass
class StepInfo:
    mode: str  # "eager", "static" or "graph"
    batch: int
    past: int  # P: cached tokens before this step
    new: int  # T: tokens in this step


class TorchCache:
    """One Generator's KV cache on one rank: buffers, and the CUDA graphs that read them."""

    def __init__(self, rank: "TorchRank", batch: int):
        self.rank, self.batch = rank, batch
        self.length = 0
        self.capacity = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slot = torch.zeros(1, dtype=torch.int64, device=rank.device)  # write position in static decode
        self.static_inputs: dict[str, torch.Tensor] = {}
        self.graphs: dict[str, _Graph] = {}
        self.pool = None  # the graphs' memory pool; a new one after every clear

    def _grow(self, total: int):
        """Buffers of at least `total` positions (powers of two from 64, at most max_seq_len); keeps the contents."""
        r = self.rank
        cap = max(64, self.capacity)
        while cap < total:
            cap *= 2
        cap = min(cap, r.max_seq_len)
        kv_heads, head_dim = r.kv_shape
        for bufs in (self.keys, self.values):
            for layer in r.kv_layers:
                new = torch.zeros((self.batch, kv_heads, cap, head_dim), dtype=r.dtype, device=r.device)
                if layer in bufs and self.length:
                    new[:, :, :self.length].copy_(bufs[layer][:, :, :self.length])
                bufs[layer] = new
        self.capacity = cap
        # captured graphs point at the old buffers; dropping the last graph of a pool frees it, and
        # capturing into a freed pool's handle fails, so the next capture takes a new pool
        self.graphs, self.pool, self.static_inputs = {}, None, {}

    def begin(self, env: dict) -> None:
        r = self.rank
        B, T = env["input_ids"].shape
        total = env["attention_mask"].shape[1]
        P = total - T
        if B != self.batch or P != self.length:
            raise CqilError(f"rank {r.rank}: a step of batch {B} after {P} positions, but the cache holds "
                            f"batch {self.batch} with {self.length}")
        if total > r.max_seq_len:
            raise CqilError(f"rank {r.rank}: {total} tokens exceed the engine's max_seq_len {r.max_seq_len}")
        with r.on_stream():
            if total > self.capacity:
                self._grow(total)
            mode = r.decode if T == 1 and P > 0 else "eager"
            if mode != "eager":
                self._set_static_inputs(env, P)
        r.active, r.step = self, StepInfo(mode, B, P, T)

    def _set_static_inputs(self, env: dict, P: int):
        """Fixed-shape model inputs for static decode; the mask is padded to the cache capacity."""
        r, s = self.rank, self.static_inputs
        if not s:
            s["input_ids"] = torch.zeros((self.batch, 1), dtype=torch.int64, device=r.device)
            s["position_ids"] = torch.zeros((self.batch, 1), dtype=torch.int64, device=r.device)
            s["attention_mask"] = torch.zeros((self.batch, self.capacity), dtype=torch.int64, device=r.device)
        for name in ("input_ids", "position_ids"):
            s[name].copy_(r.tensor(env, name, torch.int64), non_blocking=True)
        mask = s["attention_mask"]
        mask[:, P + 1:].zero_()
        mask[:, :P + 1].copy_(r.tensor(env, "attention_mask", torch.int64), non_blocking=True)
        self.slot.fill_(P)
        env.update(s)

    def end(self, env: dict, new: int) -> None:
        self.length += new

    def rewind(self, n: int) -> None:
        self.length -= n  # positions past the length are overwritten before anything reads them

    # Batch surgery (cqil.runtime.kv_cache): drop_front shifts in place, so the buffers and any
    # captured CUDA graph stay valid; select and merge change the batch, hence new buffers and graphs.

    def drop_front(self, n: int) -> None:
        with self.rank.on_stream():
            for bufs in (self.keys, self.values):
                for buf in bufs.values():
                    buf[:, :, :self.length - n] = buf[:, :, n:self.length].clone()  # the ranges overlap
        self.length -= n

    def select(self, rows) -> None:
        with self.rank.on_stream():
            index = torch.tensor(list(rows), dtype=torch.int64, device=self.rank.device)
            for bufs in (self.keys, self.values):
                for layer, buf in bufs.items():
                    bufs[layer] = buf.index_select(0, index)
        self.batch = len(rows)
        self.graphs, self.pool, self.static_inputs = {}, None, {}

    def merge(self, other: "TorchCache") -> None:
        total, batch = max(self.length, other.length), self.batch + other.batch
        capacity = max(self.capacity, other.capacity)  # each holds its own length, so this holds both
        if capacity:
            with self.rank.on_stream():
                for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
                    for layer in self.rank.kv_layers:
                        shape = (batch, *self.rank.kv_shape[:1], capacity, self.rank.kv_shape[1])
                        new = torch.zeros(shape, dtype=self.rank.dtype, device=self.rank.device)
                        for rows, cache, bufs in ((slice(0, self.batch), self, mine),
                                                  (slice(self.batch, batch), other, theirs)):
                            if cache.length:  # right-aligned: the shorter one gets zeros in front
                                new[rows, :, total - cache.length:total] = bufs[layer][:, :, :cache.length]
                        mine[layer] = new
        self.batch, self.length, self.capacity = batch, total, capacity
        self.graphs, self.pool, self.static_inputs = {}, None, {}

    def arrays(self) -> dict[str, torch.Tensor]:
        return {present_name(layer, kind): bufs[layer][:, :, :self.length]
                for layer in self.rank.kv_layers for kind, bufs in (("key", self.keys), ("value", self.values))}

    def fixed(self) -> list[torch.Tensor]:
        """Tensors whose addresses stay put between decode steps (graph inputs need no copy)."""
        return [*self.static_inputs.values(), *self.keys.values(), *self.values.values()]


class LayerCache:
    """The `kv_cache` of one rebuilt Attention: writes into the active cache's buffers of its layer."""

    def __init__(self, rank: "TorchRank", layer: int):
        self.rank, self.layer = rank, layer

    def update(self, past_key, past_value, k, v):
        cache, step = self.rank.active, self.rank.step
        key, value = cache.keys[self.layer], cache.values[self.layer]  # [B, kvh, C, hd]
        if step.mode == "eager":
            P, T = step.past, k.shape[2]
            key[:, :, P:P + T] = k
            value[:, :, P:P + T] = v
            return key[:, :, :P + T], value[:, :, :P + T]  # [B, kvh, P+T, hd]
        # fixed shapes: the position lives on the device, the mask hides the unused tail
        key.index_copy_(2, cache.slot, k)
        value.index_copy_(2, cache.slot, v)
        return key, value


class _Graph:
    """One segment's static decode, captured as a CUDA graph with static input buffers."""

    def __init__(self, gm, args: list[torch.Tensor], keep: set[int], pool):
        # keep: argument positions whose tensors are already fixed (rank inputs, KV buffers)
        self.gm = gm
        self.inputs = [a if i in keep else a.clone() for i, a in enumerate(args)]
        self.graph = torch.cuda.CUDAGraph()
        with _CAPTURE_LOCK:
            # thread_local: the other ranks' threads keep running CUDA work during the capture
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.outputs = gm(*self.inputs)
            except BaseException:
                with contextlib.suppress(Exception):  # the capture's own error is the one to report
                    self.graph.capture_end()
                raise
            self.graph.capture_end()

    def __call__(self, args):
        for buf, a in zip(self.inputs, args):
            if buf is not a:
                buf.copy_(a, non_blocking=True)
        self.graph.replay()
        return self.outputs


class TorchSegment:
    def __init__(self, rank: "TorchRank", seg, rec: dict):
        self.rank, self.gm, self.name = rank, seg.gm, seg.name
        self.inputs, self.outputs = list(seg.inputs), list(seg.outputs)
        params = {id(p): p for p in seg.gm.parameters()}.values()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params)
        self.dtypes = {t["name"]: getattr(torch, t["dtype"]) for t in rec["inputs"]}

    def _args(self, env: dict) -> list[torch.Tensor]:
        cache = self.rank.active
        args = []
        for n in self.inputs:
            if n.startswith("past_key_values."):  # the active cache's buffers (the layers write into them)
                layer, kind = n.split(".")[1:]
                args.append((cache.keys if kind == "key" else cache.values)[int(layer)])
            else:
                args.append(self.rank.tensor(env, n, self.dtypes[n]))
        return args

    def __call__(self, env: dict) -> None:
        r = self.rank
        with r.on_stream(), torch.no_grad():
            args = self._args(env)
            outs = self._graph_call(args) if r.step.mode == "graph" else self.gm(*args)
            for name, value in zip(self.outputs, outs):
                env[name] = r.publish(name, value)

    def _graph_call(self, args):
        r, cache = self.rank, self.rank.active
        graph = cache.graphs.get(self.name)
        if graph is not None:
            return graph(args)
        outs = self.gm(*args)  # this step runs eagerly (warm-up), later steps replay
        fixed = cache.fixed()
        keep = {i for i, a in enumerate(args) if any(a is b for b in fixed)}
        if cache.pool is None:
            cache.pool = torch.cuda.graph_pool_handle()
        try:
            cache.graphs[self.name] = _Graph(self.gm, args, keep, cache.pool)
        except Exception as e:  # the static form still runs, just without the graph
            r.decode, r.graph_error = "static", f"{type(e).__name__}: {first_line(e)}"
            r.step.mode = "static"  # the rest of this step too
            cache.graphs, cache.pool = {}, None
            warnings.warn(f"rank {r.rank}: CUDA graph capture of {self.name} failed ({r.graph_error}); "
                          f"decoding without graphs")
        return outs


class TorchRank(DeviceRank):
    """A rank's rebuilt segments with its weights on its device."""

    def __init__(self, spec, rank: int, device: torch.device, decode: str = "auto"):
        from cqil.model.loader import build_meta_model, parse_dtype
        from cqil.passes import build_graph
        from cqil.passes.partition import partition

        super().__init__(rank, device, parse_dtype(spec.dtype))
        cuda = device.type == "cuda"
        if decode == "auto":
            decode = "graph" if cuda else "eager"
        if decode not in DECODE_MODES[1:]:
            raise CqilError(f"torch backend: decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        if decode == "graph" and not cuda:
            raise CqilError(f"torch backend: decode='graph' needs a CUDA device, rank {rank} is on {device}")
        self.decode = decode
        self.graph_error: str | None = None  # why decode fell back from "graph" to "static"
        self.max_seq_len = spec.max_seq_len
        self.kv_layers = spec.kv_layers(rank)
        self.kv_shape = (spec.config.num_kv_heads, spec.config.head_dim)
        # what this rank sends to others: graph outputs among these are copied before they leave
        self.sent = {s.inputs[0] for s in spec.programs[rank] if s.sends(rank)}
        self.active: TorchCache | None = None  # the cache of the step being run (or last run)
        self.step: StepInfo | None = None  # and that step's form

        info = spec.rank_record(rank)
        if "weights" not in info:
            raise CqilError(f"engine: {spec.dir} has no torch weights for rank {rank}; "
                            f"recompile with --formats onnx,torch")
        model = build_meta_model(spec.config, spec.max_seq_len, self.dtype)
        segments = partition(build_graph(model, spec.plan),
                             max_segment_bytes=spec.manifest["max_segment_bytes"]).segments.get(rank, [])
        _check_interface(segments, info, rank)
        _load_weights(spec.dir / info["weights"]["file"], segments, model, device, self.dtype,
                      spec.config.tie_word_embeddings)
        for name, module in model.named_modules():
            for buf_name, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[buf_name] = buf.to(device)  # rope frequencies, kept in fp32
            if isinstance(module, Attention):
                module.kv_cache = LayerCache(self, int(name.split(".")[2]))  # model.layers.{l}.self_attn
        self.model = model
        self.segments = {s.name: TorchSegment(self, s, rec) for s, rec in zip(segments, info["segments"])}

    def publish(self, name: str, value: torch.Tensor):
        step = self.step
        if name == "logits":
            return super().publish(name, value)
        if step.mode != "eager" and name.startswith("present."):
            return value[:, :, :step.past + step.new]
        if step.mode == "graph" and name in self.sent:
            return value.clone()  # graph memory is rewritten by the next replay; the consumer may lag
        return value

    def new_cache(self, batch: int) -> TorchCache:
        return TorchCache(self, batch)

    def close(self):
        """Free the weights now: the segments' GraphModules and their Graphs form reference cycles
        that would otherwise keep device memory until a garbage collection."""
        for module in self.model.modules():
            for table in (module._parameters, module._buffers):
                for key in list(table):
                    table[key] = None
        self.segments = {}
        self.model = None


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

    from cqil.model.loader import param_names, stored_name

    names = list(dict.fromkeys(n for s in segments for n in param_names(s.gm)))
    loaded: dict[str, nn.Parameter] = {}
    try:
        f = safe_open(str(path), framework="pt", device=str(device))
    except Exception as e:
        raise CqilError(f"engine: cannot read {path}: {first_line(e)}") from None
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


def open_rank(spec, rank: int, threads, ranks_in_process: int, devices=None, decode: str = "auto") -> TorchRank:
    """`threads` is ONNX Runtime's business: torch's intra-op pool is per process (torch.set_num_threads)."""
    device = parse_devices(devices, spec.ranks)[rank]
    return TorchRank(spec, rank, device, decode)


def local_collectives(runners, timeout):
    from cqil.runtime.backends.device_collectives import DeviceCollectives
    from cqil.runtime.collectives import LocalCollectives

    ranks = list(runners.values())
    if all(r.stream is None for r in ranks):  # CPU: plain in-process collectives do
        return LocalCollectives(len(ranks), timeout=timeout)
    return DeviceCollectives([r.device for r in ranks], [r.stream for r in ranks], timeout)
