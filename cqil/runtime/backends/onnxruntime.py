"""The ONNX Runtime backend: one InferenceSession per segment."""

from __future__ import annotations

from cqil.errors import CqilError


class Segment:
    def __init__(self, session, inputs: list[str], outputs: list[str], weight_bytes: int):
        self.session, self.inputs, self.outputs, self.weight_bytes = session, inputs, outputs, weight_bytes

    def __call__(self, env: dict) -> None:
        env.update(zip(self.outputs, self.session.run(self.outputs, {n: env[n] for n in self.inputs})))


def open_segment(engine, rank: int, rec: dict, threads: int = 1, providers=None, spin: bool = True) -> Segment:
    """`spin`: let idle intra-op threads spin (fast for one rank; with several ranks in one
    process, spinning pools steal the cores the other ranks are computing on)."""
    import onnxruntime as ort

    path = engine.dir / rec["files"][0]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise CqilError(f"engine: cannot load {rec['files'][0]}: {str(e).splitlines()[0]}") from None
    want_in, want_out = [t["name"] for t in rec["inputs"]], [t["name"] for t in rec["outputs"]]
    got_in, got_out = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        unknown = sorted(set(got_in + got_out) - set(want_in + want_out)) or sorted(set(want_in + want_out) - set(got_in + got_out))
        raise CqilError(f"engine: {rec['files'][0]} does not match the manifest: unknown tensor name(s) {unknown}")
    return Segment(session, want_in, want_out, rec.get("weight_bytes", 0))
