"""The PyTorch backend and the per-rank safetensors export (`--formats onnx,torch`).

CPU: the torch engine must equal the ONNX Runtime engine (fp32 logits within 1e-5, identical greedy
tokens) for p=1 and for p=2 with bypass, in both CPU decode forms ("eager": attention over the valid
prefix; "static": fixed shapes, the form CUDA graphs capture). GPU tests run only with CUDA.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

import cqil
from cqil.compiler.cli import main as compile_main
from cqil.errors import CqilError
from cqil.exporters.torch_weights import write_safetensors
from cqil.runtime.backends.device_collectives import DeviceCollectives
from cqil.runtime.backends.device import parse_devices
from cqil.runtime.collectives import LocalCollectives

ATOL = 1e-5
FUSED_ATOL = 1e-4  # ONNX Runtime's fused attention rounds in its own order (as tests/test_fused.py)
IDS = [[5, 7, 9, 11, 13], [3, 4]]  # ragged: the second row is left-padded


def _compile(model_dir, out, **options):
    return cqil.compile(model_dir, out, progress=False, log=lambda msg: None, max_seq_len=160, **options)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama", init_std=0.2)


@pytest.fixture(scope="module")
def engine_p1(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch") / "p1"
    rc = compile_main([str(checkpoint), "--p", "1", "-o", str(out), "--formats", "onnx,torch",
                       "--max-seq-len", "160", "--no-progress", "--no-fuse"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def engine_p2(checkpoint, tmp_path_factory):
    # a ~1-layer cap on segment weights: the rebuild must cut exactly where the compile did
    return _compile(checkpoint, tmp_path_factory.mktemp("torch") / "p2", p=2, start=1, end=5, bypass=1,
                    formats=("onnx", "torch"), max_segment_bytes=200_000)


@pytest.fixture(scope="module")
def engines(engine_p1, engine_p2):
    return {"p1": engine_p1, "p2": engine_p2}


def _step_logits(engine, ids, tokens):
    """Logits of a prefill, then of one decode step per token in `tokens` [B, n]."""
    ids, mask = engine.prepare(ids)
    cache = engine.new_cache(ids.shape[0])
    positions = engine.positions(mask)
    out = [engine.forward(ids, mask, positions, cache)[:, -1]]
    for i in range(tokens.shape[1]):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        out.append(engine.forward(tokens[:, i:i + 1], mask, positions, cache)[:, -1])
    return np.stack(out, 1).astype(np.float32)


# -- export ------------------------------------------------------------------------------------

def test_manifest_records_rank_weights(engine_p2):
    manifest = json.loads((engine_p2 / "manifest.json").read_text())
    assert manifest["formats"] == ["onnx", "torch"] and manifest["max_segment_bytes"] == 200_000
    assert len(manifest["ranks"][0]["segments"]) > 6  # cut by size too, not only at the collectives
    for rank in manifest["ranks"]:
        w = rank["weights"]
        assert w["file"] == f"rank{rank['rank']}/weights.safetensors"
        assert manifest["files"][w["file"]]["bytes"] == w["bytes"] == (engine_p2 / w["file"]).stat().st_size
        with safe_open(str(engine_p2 / w["file"]), "pt") as f:
            names = set(f.keys())
        assert len(names) == w["tensors"]
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layers == set(rank["kv_layers"])  # exactly the rank's layers
        if rank["rank"] == 0:
            assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names
        else:  # rank 1 runs group members only: no embedding, head or other ranks' layers
            assert layers == {2, 4} and not any(n.startswith(("lm_head", "model.embed", "model.norm")) for n in names)


def test_tied_weights_stored_once(tiny_checkpoint, tmp_path):
    out = _compile(tiny_checkpoint("llama3"), tmp_path / "tied", p=1, formats=("onnx", "torch"))
    with safe_open(str(out / "rank0/weights.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    engine = cqil.load(out, backend="torch", devices="cpu")
    head = engine.segments[0]["seg0"].gm.get_submodule("lm_head").weight
    embed = engine.segments[0]["seg0"].gm.get_submodule("model.embed_tokens").weight
    assert head is embed
    np.testing.assert_allclose(engine.logits([[1, 2, 3]]), cqil.load(out).logits([[1, 2, 3]]), atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_write_safetensors_round_trip(tmp_path, dtype):
    tensors = {"a": torch.randn(3, 5).to(dtype), "b.c": torch.arange(7).to(dtype), "s": torch.tensor(2).to(dtype)}
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    size = write_safetensors(tmp_path / "w.safetensors", specs, iter(tensors.values()), {"k": "v"})
    assert size == (tmp_path / "w.safetensors").stat().st_size
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)


def test_write_safetensors_checks_shapes(tmp_path):
    with pytest.raises(CqilError, match="expected"):
        write_safetensors(tmp_path / "w.safetensors", [("a", torch.float32, (2,))], iter([torch.zeros(3)]))


def test_formats_must_include_onnx(checkpoint, tmp_path):
    with pytest.raises(CqilError, match="lack onnx"):
        _compile(checkpoint, tmp_path / "x", p=1, formats=("torch",))
    with pytest.raises(CqilError, match="unknown format"):
        _compile(checkpoint, tmp_path / "y", p=1, formats=("onnx", "tflite"))


# -- CPU equivalence with ONNX Runtime --------------------------------------------------------

@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("which", ["p1", "p2"])
def test_logits_match_onnxruntime(engines, which, decode):
    ort = cqil.load(engines[which], threads=1)
    tch = cqil.load(engines[which], backend="torch", devices="cpu", decode=decode)
    atol = FUSED_ATOL if ort.manifest["fused"] else ATOL  # p1 is compiled --no-fuse, p2 fused
    full = tch.logits(IDS)
    assert isinstance(full, np.ndarray) and full.dtype == np.float32
    # every real position (a padding position's logits mean nothing, and fused attention computes
    # its fully masked row differently)
    real = np.array([[1] * 5, [0] * 3 + [1] * 2]) == 1
    np.testing.assert_allclose(full[real], ort.logits(IDS)[real], atol=atol, rtol=0)
    tokens = np.array([[17, 40, 2, 99, 7, 250], [8, 8, 31, 0, 64, 1]])
    np.testing.assert_allclose(_step_logits(tch, IDS, tokens), _step_logits(ort, IDS, tokens), atol=atol, rtol=0)
    if decode == "static":
        assert tch.segments[0]["seg0"].rank.step.mode == "static"  # decode steps did use the fixed-shape form


@pytest.mark.parametrize("which", ["p1", "p2"])
def test_greedy_tokens_match_onnxruntime(engines, which):
    ort = cqil.load(engines[which], threads=1)
    tch = cqil.load(engines[which], backend="torch", devices=["cpu"] * (2 if which == "p2" else 1), decode="static")
    # 5 + 90 tokens: the KV buffers start at 64 positions and must grow (and keep their contents)
    gen = tch.generator(IDS, max_new_tokens=90)
    while not gen.done:
        gen.next_tokens()
    assert gen.tokens == ort.generate(IDS, max_new_tokens=90)
    assert gen.cache[0].capacity == 128


def test_generators_keep_their_own_buffers(engine_p2):
    """Two generators stepped in turn on one torch engine give the tokens each gives alone."""
    tch = cqil.load(engine_p2, backend="torch", devices="cpu", decode="static")
    alone = [tch.generate([row], max_new_tokens=12) for row in IDS]
    gens = [tch.generator([row], max_new_tokens=12) for row in IDS]
    while not all(g.done for g in gens):
        for g in gens:
            if not g.done:
                g.next_tokens()
    assert [g.tokens for g in gens] == alone
    assert gens[0].cache[0].keys[0].data_ptr() != gens[1].cache[0].keys[0].data_ptr()


def test_weight_bytes_per_rank(engine_p2):
    manifest = json.loads((engine_p2 / "manifest.json").read_text())
    tch = cqil.load(engine_p2, backend="torch", devices="cpu")
    for rank in manifest["ranks"]:
        assert tch.weight_bytes(rank["rank"]) == sum(s["weight_bytes"] for s in rank["segments"])


# -- refusals ---------------------------------------------------------------------------------

def test_needs_torch_weights(engine_p1, tmp_path):
    copy = shutil.copytree(engine_p1, tmp_path / "onnx_only")  # as compiled without --formats torch
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["ranks"][0]["weights"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CqilError, match="--formats onnx,torch"):
        cqil.load(copy, backend="torch", devices="cpu", verify=False)


def test_refuses_rebuilt_interface_mismatch(engine_p2, tmp_path):
    copy = shutil.copytree(engine_p2, tmp_path / "edited")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["ranks"][1]["segments"][0]["outputs"][0]["name"] = "renamed"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CqilError, match="rebuilds with inputs"):
        cqil.load(copy, backend="torch", devices="cpu", verify=False)


def test_refuses_truncated_weights(engine_p1, tmp_path):
    copy = shutil.copytree(engine_p1, tmp_path / "broken")
    path = copy / "rank0/weights.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CqilError, match="weights.safetensors"):
        cqil.load(copy, backend="torch", devices="cpu", verify=False)


@pytest.mark.parametrize("options, message", [
    ({"decode": "graph"}, "needs a CUDA device"),
    ({"decode": "fast"}, "decode must be one of"),
    ({"devices": "tpu"}, "device"),
    ({"devices": []}, "one device per rank"),
])
def test_bad_options(engine_p1, options, message):
    with pytest.raises(CqilError, match=message):
        cqil.load(engine_p1, backend="torch", **{"devices": "cpu", **options})


def test_unknown_backend(engine_p1):
    with pytest.raises(CqilError, match="available: onnxruntime, torch, tensorrt"):
        cqil.load(engine_p1, backend="jax")


def test_parse_devices_cpu():
    if not torch.cuda.is_available():
        assert parse_devices(None, [0, 1]) == {0: torch.device("cpu"), 1: torch.device("cpu")}
    assert parse_devices("cpu", [0, 1]) == {0: torch.device("cpu"), 1: torch.device("cpu")}
    assert parse_devices(["cpu", "cpu"], [1]) == {1: torch.device("cpu")}
    if not torch.cuda.is_available():
        with pytest.raises(CqilError, match="no CUDA device"):
            parse_devices(["cpu", "cuda:0"], [0, 1])


class _Pool:
    """A stand-in for a CUDA graph memory pool: once the last graph captured into it is freed, the
    allocator forgets it, and capturing into its handle fails (PyTorch's `use_count > 0` assertion)."""

    def __init__(self):
        self.graphs, self.used = 0, False


class _Graph:
    """A stand-in torch.cuda.CUDAGraph that keeps its pool's use count."""

    captures: list = []

    def capture_begin(self, pool=None, capture_error_mode=None):
        if pool.used and pool.graphs == 0:
            raise RuntimeError("Expected use_count > 0 (the pool's last graph was freed)")
        pool.graphs, pool.used, self.pool = pool.graphs + 1, True, pool
        _Graph.captures.append(pool)

    def capture_end(self):
        pass

    def __del__(self):
        if hasattr(self, "pool"):
            self.pool.graphs -= 1


def test_graphs_take_a_fresh_pool_after_the_cache_grows(engine_p1, monkeypatch):
    """Capacity growth drops a cache's graphs (they read the old buffers); recapturing into the
    dropped graphs' pool would fail and silently leave decode without graphs for good."""
    import cqil.runtime.backends.torch_backend as tb

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", _Pool)
    monkeypatch.setattr(tb._Graph, "__call__", lambda self, args: self.gm(*args))  # "replay": run it
    _Graph.captures = []
    tch = cqil.load(engine_p1, backend="torch", devices="cpu", decode="static")
    rank = tch.runners[0]
    rank.decode = "graph"
    want = cqil.load(engine_p1, threads=1).generate(IDS, max_new_tokens=90)
    gen = tch.generator(IDS, max_new_tokens=90)  # 5 + 90 positions: the buffers grow from 64 to 128
    while not gen.done:
        gen.next_tokens()
    assert rank.graph_error is None and rank.decode == "graph"
    assert gen.cache[0].capacity == 128 and gen.cache[0].graphs
    assert len(_Graph.captures) == 2 and _Graph.captures[0] is not _Graph.captures[1]  # a new pool after growth
    assert gen.tokens == want


def test_cpu_ranks_use_plain_collectives(engine_p2):
    tch = cqil.load(engine_p2, backend="torch", devices="cpu")
    assert type(tch.collectives) is LocalCollectives


# -- CUDA (skipped without a device) ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["eager", "static", "graph"])
@pytest.mark.parametrize("which", ["p1", "p2"])
def test_cuda_matches_onnxruntime(engines, which, decode):
    ort = cqil.load(engines[which], threads=1)
    gpu = cqil.load(engines[which], backend="torch", devices="cuda:0", decode=decode)
    np.testing.assert_allclose(gpu.logits(IDS), ort.logits(IDS), atol=1e-4, rtol=0)
    tokens = np.array([[17, 40, 2, 99, 7, 250], [8, 8, 31, 0, 64, 1]])
    np.testing.assert_allclose(_step_logits(gpu, IDS, tokens), _step_logits(ort, IDS, tokens), atol=1e-4, rtol=0)
    assert gpu.generate(IDS, max_new_tokens=90) == ort.generate(IDS, max_new_tokens=90)
    rank0 = gpu.segments[0]["seg0"].rank
    if decode == "graph":
        assert rank0.graph_error is None and rank0.graphs  # decode replayed captured graphs
    if which == "p2":
        assert isinstance(gpu.collectives, DeviceCollectives)
        streams = {gpu.segments[r]["seg0"].rank.stream.cuda_stream for r in (0, 1)}
        assert len(streams) == 2  # one stream per rank, on the same GPU


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_match_onnxruntime(engine_p2):
    ort = cqil.load(engine_p2, threads=1)
    gpu = cqil.load(engine_p2, backend="torch", devices=["cuda:0", "cuda:1"])
    assert gpu.generate(IDS, max_new_tokens=40) == ort.generate(IDS, max_new_tokens=40)


def test_device_collectives_protocol(monkeypatch):
    """DeviceCollectives with stand-in streams and events: every consumer waits on each producer's
    event before using its value, events alternate per rank, sums are in rank order on every rank."""
    import contextlib
    import threading

    log, lock = [], threading.Lock()

    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.id, self.recorded = Event.count, 0

        def record(self, stream):
            with lock:
                self.recorded += 1
                log.append(("record", stream.rank, self.id, self.recorded))

    class Stream:
        def __init__(self, rank):
            self.rank = rank

        def wait_event(self, event):
            with lock:
                log.append(("wait", self.rank, event.id, event.recorded))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(("use", s.rank)))
    coll = DeviceCollectives([torch.device("cpu")] * 3, [Stream(r) for r in range(3)], timeout=30)
    values = [torch.tensor([0.1, 1e8]), torch.tensor([0.2, -1e8]), torch.tensor([0.3, 1.0])]
    results = {}

    def run(rank):
        results[rank] = [coll(rank, "all_reduce", values[rank]),
                         coll(rank, "all_gather", values[rank] * 2),
                         coll(rank, "broadcast", values[0] if rank == 0 else None),
                         coll(rank, "all_reduce", values[rank])]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = (values[0] + values[1]) + values[2]  # rank order: 1e8 - 1e8 first, then 1.0
    for r in range(3):
        assert torch.equal(results[r][0], expected) and torch.equal(results[r][3], expected)
        assert all(torch.equal(a, b * 2) for a, b in zip(results[r][1], values))
        assert torch.equal(results[r][2], values[0])
    waits = [e for e in log if e[0] == "wait"]
    # 2 all_reduce + 1 all_gather: each rank waits on the 2 others; broadcast: ranks 1, 2 wait on rank 0
    assert len(waits) == 3 * 3 * 2 + 2
    assert all(w[3] >= 1 for w in waits)  # never on an event not yet recorded
    assert len({e[2] for e in log if e[0] == "record"}) == 6  # two events per rank, used in turn
