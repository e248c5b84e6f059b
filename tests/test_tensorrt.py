"""TensorRT export and backend: everything that runs without TensorRT.

TensorRT cannot be installed here (its libraries come from NVIDIA's own index), so the real build
and run are marked `gpu` and skip without both CUDA and `tensorrt`. What is tested: the optimization
profile derived from a real manifest, the engine compatibility check, the one-line errors when
TensorRT is missing, and the compile plumbing (flags, profile, timing cache, manifest records)
against a stand-in `tensorrt` module that records the calls it gets.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

import cqil
from cqil.cli_util import run_main
from cqil.compiler.cli import main as compile_main
from cqil.errors import CqilError
from cqil.exporters.tensorrt import (PROFILES, check_engine_compatibility, input_profile, profile_for, profiles,
                                    require_tensorrt)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
RECORD = {"tensorrt_version": "10.3.0.26", "compute_capability": "9.0", "device_name": "NVIDIA H100"}


# -- profile ----------------------------------------------------------------------------------

def test_profiles():
    axes = profiles(max_batch=4, max_seq_len=128)
    assert list(axes) == list(PROFILES)
    assert axes["decode"] == {"batch": (1, 1, 4), "sequence": (1, 1, 1), "past_sequence": (0, 64, 127),
                              "total_sequence": (1, 65, 128)}
    assert axes["prefill"]["sequence"] == (1, 128, 128) and axes["prefill"]["past_sequence"] == (0, 0, 0)
    assert axes["chunk"]["sequence"] == (1, 1, 64) and axes["chunk"]["past_sequence"] == (0, 0, 64)
    for ax in axes.values():
        assert ax["total_sequence"][2] <= 128  # activation memory sized for max_seq_len, not 2x
        for i in range(3):  # total = past + new at min, opt and max: TensorRT checks shapes there
            assert ax["total_sequence"][i] == ax["past_sequence"][i] + ax["sequence"][i]


@pytest.mark.parametrize("batch, sequence, past, profile", [
    (1, 1, 100, 0), (4, 1, 0, 0), (2, 128, 0, 1), (1, 5, 0, 1), (1, 64, 64, 2), (1, 3, 60, 2),
    (1, 65, 10, None), (1, 2, 127, None), (5, 1, 0, None)])
def test_profile_for(batch, sequence, past, profile):
    assert profile_for(profiles(4, 128), batch, sequence, past) == profile


def test_profiles_tiny_and_invalid():
    assert profiles(1, 1)["decode"]["past_sequence"] == (0, 0, 0)
    with pytest.raises(CqilError, match="must be positive"):
        profiles(0, 16)


def test_input_profile_by_hand():
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
              {"name": "past_key_values.3.key", "dtype": "float16", "shape": ["batch", 2, "past_sequence", 16]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]}]
    profile = input_profile(inputs, profiles(8, 64)["decode"])
    assert profile["input_ids"] == ((1, 1), (1, 1), (8, 1))
    assert profile["past_key_values.3.key"] == ((1, 2, 0, 16), (1, 2, 32, 16), (8, 2, 63, 16))
    assert profile["attention_mask"] == ((1, 1), (1, 33), (8, 64))


def test_input_profile_unknown_axis():
    with pytest.raises(CqilError, match="'heads'"):
        input_profile([{"name": "x", "dtype": "float32", "shape": ["batch", "heads"]}], profiles(1, 8)["decode"])


# -- compatibility ----------------------------------------------------------------------------

@pytest.mark.parametrize("version, cc, error", [
    ("10.3.0.26", "9.0", None),
    ("10.3.0.30", (9, 0), None),  # same release, another build: same engine format
    ("10.4.0.26", "9.0", "built with TensorRT 10.3.0, this is TensorRT 10.4.0"),
    ("8.6.1", "9.0", "recompile with --backend tensorrt here"),
    ("10.3.0.26", (8, 0), "compute capability 9.0 \\(NVIDIA H100\\), this GPU is 8.0"),
    ("10.3.0.26", "8.9", "recompile with --backend tensorrt on this GPU"),
])
def test_check_engine_compatibility(version, cc, error):
    if error is None:
        check_engine_compatibility(RECORD, version, cc)
    else:
        with pytest.raises(CqilError, match=error):
            check_engine_compatibility(RECORD, version, cc)


@pytest.mark.parametrize("record", [None, {}])
def test_check_engine_compatibility_without_engines(record):
    with pytest.raises(CqilError, match="has no TensorRT engines"):
        check_engine_compatibility(record, "10.3.0", "9.0")


# -- TensorRT missing -------------------------------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_require_tensorrt_missing(no_tensorrt):
    with pytest.raises(CqilError, match="TensorRT is not installed") as e:
        require_tensorrt()
    assert "\n" not in str(e.value)


def test_compile_cli_without_tensorrt(no_tensorrt, tiny_checkpoint, tmp_path, capsys):
    out, model = tmp_path / "engine", tiny_checkpoint("llama")
    capsys.readouterr()
    rc = run_main("cqil-compile", compile_main, [str(model), "--p", "2", "--start", "1", "--end", "5", "-o", str(out),
                                                 "--backend", "tensorrt", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("cqil-compile: error: TensorRT is not installed") and "\n" not in err
    assert not out.exists() and not list(tmp_path.iterdir())  # failed before writing anything


def test_runtime_backend_without_tensorrt(no_tensorrt, engine):
    with pytest.raises(CqilError, match="TensorRT is not installed"):
        cqil.load(engine, backend="tensorrt")


# -- compile plumbing, against a stand-in tensorrt module ------------------------------------

class _Recorder:
    def __init__(self):
        self.networks, self.flags, self.profiles, self.caches_loaded, self.network_flags = [], [], [], [], []


def _fake_tensorrt(rec: _Recorder) -> types.ModuleType:
    """Just enough of TensorRT's builder API for build_engines; it records what it is asked."""
    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.26"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            model = onnx.load(path, load_external_data=False)
            self.network.inputs = [i.name for i in model.graph.input]
            self.network.path = path
            return True

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = [], [], None

        def set_flag(self, flag):
            self.flags.append(flag)

        def create_timing_cache(self, data):
            rec.caches_loaded.append(bytes(data))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def set_memory_pool_limit(self, pool, size):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.network_flags.append(flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            assert config.cache is not None and len(config.profiles) == 3
            rec.networks.append(network.path)
            rec.flags.append(list(config.flags))
            rec.profiles.append([p.shapes for p in config.profiles])
            return b"engine of " + network.path.encode()

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    return trt


@pytest.fixture(scope="module")
def fake_build(tiny_checkpoint, tmp_path_factory):
    """A float16 p=2 engine compiled with --backend tensorrt against the stand-in module."""
    rec = _Recorder()
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "tensorrt", _fake_tensorrt(rec))
    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "set_device", lambda device: None)
    mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    mp.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    try:
        out = tmp_path_factory.mktemp("trt") / "engine"
        rc = compile_main([str(tiny_checkpoint("llama")), "--p", "2", "--start", "1", "--end", "5", "--bypass", "1",
                           "-o", str(out), "--backend", "tensorrt", "--dtype", "float16", "--max-seq-len", "32",
                           "--max-batch", "4", "--no-progress"])
    finally:
        mp.undo()
    assert rc == 0
    return out, rec


@pytest.fixture(scope="module")
def engine(fake_build):
    return fake_build[0]


def test_fake_build_manifest(fake_build):
    out, rec = fake_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["formats"] == ["onnx", "tensorrt"]
    trt = manifest["tensorrt"]
    assert trt["tensorrt_version"] == "10.3.0.26" and trt["compute_capability"] == "9.0"
    assert trt["precision_flags"] == [] and trt["strongly_typed"] and trt["max_batch"] == 4
    assert trt["profiles"]["decode"]["total_sequence"] == [1, 17, 32]
    assert (out / trt["timing_cache"]).read_bytes() == b"timing-cache"
    assert "timing.cache" in manifest["files"]
    segments = [(r["rank"], s) for r in manifest["ranks"] for s in r["segments"]]
    assert len(rec.networks) == len(segments)
    for rank, seg in segments:
        assert seg["tensorrt_engine"] == f"rank{rank}/{seg['name']}.engine"
        # built from this segment's ONNX file (in the compile's temporary folder, since renamed)
        assert (out / seg["tensorrt_engine"]).read_bytes().endswith(f"/{seg['files'][0]}".encode())
        assert seg["tensorrt_engine"] in manifest["files"]
    assert all(flags == [] for flags in rec.flags)  # strongly typed: the ONNX types, no precision flag
    assert all(f == 1 << 1 for f in rec.network_flags)  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert rec.caches_loaded == [b""]  # one cache, created once and shared by every segment


def test_fake_build_profiles_follow_the_manifest(fake_build):
    out, rec = fake_build
    manifest = json.loads((out / "manifest.json").read_text())
    axes = {name: {k: tuple(v) for k, v in ax.items()} for name, ax in manifest["tensorrt"]["profiles"].items()}
    segments = [s for r in manifest["ranks"] for s in r["segments"]]
    assert len(rec.profiles) == len(segments)
    for seg, shapes in zip(segments, rec.profiles):
        assert shapes == [input_profile(seg["inputs"], axes[name]) for name in PROFILES]
    decode_past = [p[0][n] for p in rec.profiles for n in p[0] if n.startswith("past_key_values")]
    assert decode_past and all(lo[0] == 1 and lo[2] == 0 and hi[0] == 4 and hi[2] == 31 for lo, _, hi in decode_past)


def test_weakly_typed_build_needs_the_flag(tiny_checkpoint, tmp_path):
    """TensorRT 11 has no FP16 builder flag: asking for a weakly typed fp16 build says so."""
    from cqil.exporters.tensorrt import _build_one

    rec = _Recorder()
    trt = _fake_tensorrt(rec)
    trt.__version__ = "11.0.0"
    trt.BuilderFlag = types.SimpleNamespace()
    engine = cqil.compile(tiny_checkpoint("llama"), tmp_path / "e", p=1, max_seq_len=16, progress=False,
                          log=lambda m: None)
    seg = json.loads((engine / "manifest.json").read_text())["ranks"][0]["segments"][0]
    shapes = [input_profile(seg["inputs"], ax) for ax in profiles(1, 16).values()]
    builder = trt.Builder(None)
    with pytest.raises(CqilError, match="has no FP16 builder flag; build strongly typed"):
        _build_one(trt, builder, None, engine / seg["files"][0], seg, shapes, ("FP16",), object(), False, None)


# -- runtime plumbing: shared activation memory, profile selection (stand-ins, on the CPU) -------

class _FakeContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy, self.memory, self.profiles, self.shapes, self.addresses = engine, strategy, None, [], {}, {}

    def set_device_memory(self, address, size):
        self.memory = (address, size)

    def set_optimization_profile_async(self, index, stream):
        self.profiles.append(index)

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        B, T = self.shapes["input_ids"]
        return (B, T, 256) if name == "logits" else (-1,)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        return True


def _fake_runtime(trt, seg_specs, memory):
    class FakeEngine:
        def __init__(self, data):
            self.name = data.decode()
            self.device_memory_size_v2 = memory[self.name]
            spec = seg_specs[self.name]
            self.io = [(t["name"], trt.TensorIOMode.INPUT) for t in spec["inputs"]] + \
                      [(t["name"], trt.TensorIOMode.OUTPUT) for t in spec["outputs"]]
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return dict(self.io)[name]

        def get_tensor_dtype(self, name):
            return trt.DataType.INT64 if name in ("input_ids", "attention_mask", "position_ids") else trt.DataType.FLOAT

        def create_execution_context(self, strategy):
            return _FakeContext(self, strategy)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine(data)

    trt.Runtime = Runtime
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = types.SimpleNamespace(FLOAT="f32", INT64="i64")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user-managed")
    return trt


def test_rank_contexts_share_activation_memory_and_switch_profiles(engine, tmp_path, monkeypatch):
    import cqil.runtime.backends.tensorrt as trt_backend
    from cqil.runtime.spec import EngineSpec

    copy = tmp_path / "engine"
    import shutil
    shutil.copytree(engine, copy)
    spec = EngineSpec.read(copy, verify=False)
    segs = spec.segments(0)
    for s in segs:  # each serialized engine names its segment, so the stand-in knows which it is
        (copy / s["tensorrt_engine"]).write_bytes(s["name"].encode())
    memory = {s["name"]: 1000 * (i + 1) for i, s in enumerate(segs)}
    trt = _fake_runtime(_fake_tensorrt(_Recorder()), {s["name"]: s for s in segs}, memory)
    monkeypatch.setattr(trt_backend, "_RUNTIME", {})
    rank = trt_backend.TrtRank(spec, 0, torch.device("cpu"), trt)
    contexts = [s.context for s in rank.segments.values()]
    assert {c.strategy for c in contexts} == {"user-managed"}
    assert {c.memory for c in contexts} == {(rank.activations.data_ptr(), max(memory.values()))}
    seg = next(iter(rank.segments.values()))
    for (T, P), profile in {(1, 10): 0, (8, 0): 1, (4, 4): 2}.items():
        seg._select_profile({"input_ids": np.zeros((1, T)), "attention_mask": np.zeros((1, P + T))}, 0)
        assert seg.profile == profile
    assert seg.context.profiles == [1, 2]  # profile 0 was current from the start
    with pytest.raises(CqilError, match="fits none of the TensorRT profiles"):
        seg._select_profile({"input_ids": np.zeros((1, 3)), "attention_mask": np.zeros((1, 31))}, 0)


def test_fake_build_engine_still_runs_on_onnxruntime(engine):
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["dtype"] == "float16"
    out = cqil.load(engine, threads=1).generate([[1, 2, 3]], max_new_tokens=3)
    assert len(out[0]) == 6


# -- the real thing (needs CUDA and TensorRT) -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (its libraries come from NVIDIA's index)")
def test_tensorrt_engine_matches_onnxruntime(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", init_std=0.2)
    out = cqil.compile(model, tmp_path / "trt", p=2, start=1, end=5, bypass=1, max_seq_len=64, progress=False,
                       formats=("onnx", "tensorrt"), max_batch=2, log=lambda m: None)
    ids = [[5, 7, 9, 11], [3, 4]]
    ort, trt = cqil.load(out, threads=1), cqil.load(out, backend="tensorrt", devices="cuda:0")
    np.testing.assert_allclose(trt.logits(ids), ort.logits(ids), atol=1e-3, rtol=0)
    assert trt.generate(ids, max_new_tokens=20) == ort.generate(ids, max_new_tokens=20)
