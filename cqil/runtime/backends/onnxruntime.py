"""The ONNX Runtime backend: one InferenceSession per segment, numpy values, the ONNX KV cache form.

    engine = cqil.load("engine_dir")                                  # CPUExecutionProvider
    engine = cqil.load("engine_dir", providers=["CPUExecutionProvider"])

Options: `providers` (ONNX Runtime execution providers, default CPU). Thread pools: each session
gets the intra-op threads the Engine assigns its segment; with several ranks in one process, idle
pool threads do not spin (spinning pools steal the cores the other ranks compute on).
"""

from __future__ import annotations

import numpy as np

from cqil.errors import CqilError, first_line
from cqil.runtime.collectives import LocalCollectives
from cqil.runtime.kv_cache import ConcatCache

OPTIONS = frozenset({"providers"})


class OrtSegment:
    def __init__(self, session, file: str, inputs: list[str], outputs: list[str], weight_bytes: int):
        self.session, self.file = session, file
        self.inputs, self.outputs, self.weight_bytes = inputs, outputs, weight_bytes

    def __call__(self, env: dict) -> None:
        feeds = {n: env[n] for n in self.inputs}
        try:
            results = self.session.run(self.outputs, feeds)
        except Exception as e:  # ONNX Runtime's Fail / InvalidArgument / RuntimeException: a damaged engine
            raise CqilError(f"engine: {self.file} failed: {first_line(e)}") from None
        env.update(zip(self.outputs, results))


def open_session(path, rec: dict, threads: int, spin: bool, providers=None) -> OrtSegment:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise CqilError(f"engine: cannot load {rec['files'][0]}: {first_line(e)}") from None
    want_in, want_out = [t["name"] for t in rec["inputs"]], [t["name"] for t in rec["outputs"]]
    got_in, got_out = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        unknown = sorted(set(got_in + got_out) - set(want_in + want_out)) or sorted(set(want_in + want_out) - set(got_in + got_out))
        raise CqilError(f"engine: {rec['files'][0]} does not match the manifest: unknown tensor name(s) {unknown}")
    return OrtSegment(session, rec["files"][0], want_in, want_out, rec.get("weight_bytes", 0))


class OrtRank:
    def __init__(self, spec, rank: int, threads, ranks_in_process: int, providers=None):
        self.rank = rank
        self.kv_layers = spec.kv_layers(rank)
        cfg = spec.config
        self._kv_shape, self._dtype = (cfg.num_kv_heads, 0, cfg.head_dim), spec.float_dtype
        spin = ranks_in_process == 1
        self.segments = {rec["name"]: open_session(spec.dir / rec["files"][0], rec, threads(rec), spin, providers)
                         for rec in spec.segments(rank)}

    def new_cache(self, batch: int) -> ConcatCache:
        return ConcatCache(self.kv_layers, np.zeros((batch, *self._kv_shape), self._dtype))

    def close(self):
        self.segments = {}  # sessions are freed with their last reference


def open_rank(spec, rank: int, threads, ranks_in_process: int, providers=None) -> OrtRank:
    return OrtRank(spec, rank, threads, ranks_in_process, providers)


def local_collectives(runners, timeout):
    return LocalCollectives(len(runners), timeout=timeout)
