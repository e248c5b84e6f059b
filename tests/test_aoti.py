"""`--formats aoti` and the Python `aoti` backend: the buffer form, the manifest records and their
schema, the same tokens and logits as ONNX Runtime on the fixture at p=1, p=2 (d=1) and p=4, the KV
cache written in place and its batch surgery, refusals (another torch, a missing CPU feature, CUDA).

The engines are compiled once per session by `aoti_util` (shared with test_native.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import cqil
from cqil.compiler.cli import main as compile_main
from cqil.errors import CqilError
from cqil.exporters.aoti import BufferAttention, to_buffer_form
from cqil.exporters.manifest import read_manifest
from cqil.exporters.schema import check_manifest
from cqil.model.loader import load_model
from cqil.passes import build_graph
from cqil.passes.partition import partition
from cqil.plan import Plan
from cqil.runtime.backends import aoti as aoti_backend
from cqil.runtime.cli import run_cli
from cqil.runtime.generator import Generator
from cqil.runtime.sampling import SamplingParams
from aoti_util import FIXTURE, PLANS, aoti_engines, engine_copy  # noqa: F401  (a fixture)
from engine_util import assert_one_line_error, cli

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 301, 302], [40, 41, 42, 43, 44]]
STEPS = 32
ATOL = 1e-4


def greedy(engine, prompts, steps=STEPS):
    gen = engine.generator(prompts, max_new_tokens=steps)
    tokens = [gen.next_tokens() for _ in range(steps)]
    return np.stack(tokens, 1), gen.logits


# -- the buffer form, without compiling ---------------------------------------------------------


def test_buffer_form_writes_the_cache_in_place_and_matches_the_concat_form():
    model = load_model(FIXTURE, dtype="float32")
    part = partition(build_graph(model, Plan(num_layers=12, p=1, start=0, end=0)))
    seg = part.segments[0][0]
    gm, outputs = to_buffer_form(seg)
    assert outputs == ["logits"] and all(not n.startswith("present.") for n in outputs)
    assert sum(isinstance(m, BufferAttention) for m in gm.modules()) == 12
    assert not any(isinstance(m, BufferAttention) for m in seg.gm.modules())  # the segment is left as it was
    B, P, T, C = 2, 4, 3, 10  # prefill P positions, then T more, into buffers of capacity C
    ids = torch.randint(0, 4096, (B, P + T))
    mask, pos = torch.ones(B, P + T, dtype=torch.long), torch.arange(P + T).expand(B, P + T)
    empty = torch.zeros(B, 2, 0, 32)
    buffers = {n: torch.zeros(B, 2, C, 32) for n in seg.inputs if n.startswith("past_key_values.")}

    def feed(start, stop, past):
        values = {"input_ids": ids[:, start:stop], "position_ids": pos[:, start:stop], "attention_mask": mask[:, :stop]}
        return [values[n] if n in values else past(n) for n in seg.inputs]

    with torch.no_grad():
        ref = seg.gm(*feed(0, P + T, lambda n: empty))  # the concat form, in one go
        ptr = buffers["past_key_values.0.key"].data_ptr()
        first = gm(*feed(0, P, buffers.get))
        second = gm(*feed(P, P + T, buffers.get))
    assert buffers["past_key_values.0.key"].data_ptr() == ptr
    assert not buffers["past_key_values.0.key"][:, :, P + T:].any()  # the tail beyond S stays untouched
    ref = dict(zip(seg.outputs, ref))
    assert torch.allclose(first[0], ref["logits"][:, :P], atol=1e-5)
    assert torch.allclose(second[0], ref["logits"][:, P:], atol=1e-5)
    for name, present in ref.items():
        if name.startswith("present."):
            assert torch.allclose(buffers[name.replace("present.", "past_key_values.")][:, :, :P + T], present, atol=1e-6)


# -- manifest and schema ----------------------------------------------------------------------


def test_manifest_records_every_package(aoti_engines):
    engine = aoti_engines("p2")
    m = read_manifest(engine)  # schema + every file's sha256
    assert "aoti" in m["formats"]
    rec = m["aoti"]
    assert rec["device"] == "cpu" and rec["torch"] == torch.__version__ and rec["kv_layout"] == "buffer"
    assert rec["isa"] and rec["dims"]["kv_capacity"] == [3, 129] and rec["dims"]["total_sequence"] == [1, 128]
    assert rec["inductor_configs"] == {"aot_inductor.check_lowerbound": False}
    for rank in m["ranks"]:
        for seg in rank["segments"]:
            pkg = seg["aoti"]
            assert pkg["file"] == f"rank{rank['rank']}/{seg['name']}.pt2" and pkg["file"] in m["files"]
            assert [t["name"] for t in pkg["inputs"]] == [t["name"] for t in seg["inputs"]]
            assert [t["name"] for t in pkg["outputs"]] == [t["name"] for t in seg["outputs"]
                                                           if not t["name"].startswith("present.")]
            for t in pkg["inputs"]:
                if t["name"].startswith("past_key_values."):
                    assert t["shape"] == ["batch", 2, "kv_capacity", 32]
    assert not list(engine.glob("**/tmp*")), "the inductor cache was left behind"


@pytest.mark.parametrize("change, message", [
    (lambda m: m["aoti"].update(device="tpu"), "aoti.device must be one of cpu, cuda"),
    (lambda m: m["aoti"].update(kv_layout="concat"), "aoti.kv_layout must be 'buffer'"),
    (lambda m: m["aoti"]["dims"].update(batch=[0, 8]), "aoti.dims.batch must be [min, max]"),
    (lambda m: m["files"].pop(m["ranks"][0]["segments"][0]["aoti"]["file"]), "has no checksum"),
    (lambda m: m["ranks"][0]["segments"][0]["aoti"].update(file="../x.pt2"), "must be a path inside"),
    (lambda m: m["ranks"][0]["segments"][0].pop("aoti"), "segments[0].aoti is missing"),
    (lambda m: m["ranks"][0]["segments"][0]["aoti"]["inputs"][0].update(shape=["batch", "kv_len"]), "shape[1] must be"),
])
def test_schema_refuses_bad_aoti_records(aoti_engines, change, message):
    m = json.loads((aoti_engines("p1") / "manifest.json").read_text())
    check_manifest(copy.deepcopy(m), "manifest.json")
    change(m)
    with pytest.raises(CqilError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_manifest(m, "manifest.json")


# -- the aoti backend against ONNX Runtime ------------------------------------------------------


@pytest.mark.parametrize("plan", list(PLANS))
def test_aoti_backend_gives_the_onnx_tokens_and_logits(aoti_engines, plan):
    engine_dir = aoti_engines(plan)
    with cqil.load(engine_dir, threads=1) as ort, cqil.load(engine_dir, threads=1, backend="aoti") as aoti:
        want_tokens, want_logits = greedy(ort, PROMPTS)
        tokens, logits = greedy(aoti, PROMPTS)
    np.testing.assert_array_equal(tokens, want_tokens)
    assert np.abs(logits - want_logits).max() < ATOL


def test_cache_is_written_in_place_and_sized_once(aoti_engines):
    with cqil.load(aoti_engines("p2"), threads=1, backend="aoti") as engine:
        gen = engine.generator(PROMPTS[:1], max_new_tokens=20)
        caches = gen.cache
        ptrs = {r: {n: b.data_ptr() for n, b in c.buffers.items()} for r, c in caches.items()}
        for _ in range(20):
            gen.next_tokens()
        for r, cache in caches.items():
            assert cache.capacity == 64 and cache.length == len(PROMPTS[0]) + 19  # the last token is not fed
            assert {n: b.data_ptr() for n, b in cache.buffers.items()} == ptrs[r], "a buffer was replaced"
        assert set(caches[1].buffers) == {(layer, kind) for layer in (7, 9) for kind in ("key", "value")}
        gen.append_tokens([list(range(100, 160))])  # outgrows 64 positions: one reallocation, contents kept
        assert caches[0].capacity == 128 and caches[0].length == len(PROMPTS[0]) + 20 + 60
        with pytest.raises(CqilError, match="max_seq_len"):
            gen.append_tokens([list(range(100, 160))])


def test_rows_joining_and_leaving_get_what_they_get_alone(aoti_engines):
    """The KVCache protocol's select / merge / drop_front on the buffers (continuous batching)."""
    params = SamplingParams(temperature=0, max_tokens=20)
    with cqil.load(aoti_engines("p2"), threads=1, backend="aoti") as engine:
        alone = {i: Generator(engine, [p], params=params) for i, p in enumerate(PROMPTS)}
        want = {i: [int(g.next_tokens()[0]) for _ in range(8)] for i, g in alone.items()}
        gen = Generator(engine, PROMPTS[:2], params=params)
        got = {0: [], 1: [], 2: []}
        for _ in range(3):
            for row, t in zip((0, 1), gen.next_tokens()):
                got[row].append(int(t))
        gen.merge(Generator(engine, [PROMPTS[2]], params=params))
        for _ in range(2):
            for row, t in zip((0, 1, 2), gen.next_tokens()):
                got[row].append(int(t))
        gen.select([0, 2])  # row 1 leaves; padding columns in front go (drop_front)
        for _ in range(3):
            for row, t in zip((0, 2), gen.next_tokens()):
                got[row].append(int(t))
    assert got[0] == want[0][:8] and got[1] == want[1][:5] and got[2] == want[2][:5]


# -- refusals -------------------------------------------------------------------------------------


def edited_copy(src, tmp_path, edit):
    dst = engine_copy(src, tmp_path / "engine")
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_packages_of_another_torch_or_cpu_are_refused(aoti_engines, tmp_path, monkeypatch):
    other = edited_copy(aoti_engines("p1"), tmp_path, lambda m: m["aoti"].update(torch="2.12.1"))
    with pytest.raises(CqilError, match="built by torch 2.12.1, this is torch 2.13"):
        cqil.load(other, backend="aoti")
    monkeypatch.setattr(aoti_backend, "_cpu_flags", lambda: frozenset({"avx", "fma", "f16c"}))
    with pytest.raises(CqilError, match="compiled for CPUs with AVX2, and this CPU lacks avx2"):
        cqil.load(aoti_engines("p1"), backend="aoti")


def test_onnx_only_engines_and_cuda_devices_are_refused(aoti_engines, tmp_path):
    onnx_only = edited_copy(aoti_engines("p1"), tmp_path, lambda m: m.pop("aoti"))
    with pytest.raises(CqilError, match="has no AOTInductor packages: recompile it with --formats onnx,aoti"):
        cqil.load(onnx_only, backend="aoti")
    if not torch.cuda.is_available():
        with pytest.raises(CqilError, match="devices: rank 0 asks for cuda"):
            cqil.load(aoti_engines("p1"), backend="aoti", devices="cuda")


def test_cqil_run_with_the_aoti_backend(aoti_engines, capsys):
    engine = aoti_engines("p1")
    base = [engine, "--input-ids", "5,6,7", "--max-new-tokens", "6", "--json", "--threads", "1"]
    code, out, err = cli("cqil-run", run_cli, [*base, "--backend", "aoti"], capsys)
    assert code == 0, err
    code, ref, err = cli("cqil-run", run_cli, base, capsys)
    assert json.loads(out)["output_ids"] == json.loads(ref)["output_ids"]


@pytest.mark.parametrize("argv, words", [
    (["--formats", "onnx,aoti", "--devices", "cuda"], ["--devices cuda", "compile with --devices cpu"]),
    (["--devices", "cuda"], ["go with --formats ...,aoti"]),
    (["--formats", "onnx,aoti", "--max-seq-len", "4"], ["needs --max-seq-len >= 8"]),
    (["--formats", "onnx,aoti", "--max-batch", "0"], ["--max-batch must be >= 1"]),
])
def test_compile_refuses_what_it_cannot_build(tmp_path, capsys, argv, words):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine can build CUDA packages")
    code, _, err = cli("cqil-compile", compile_main, [FIXTURE, "--p", "1", "-o", tmp_path / "e", *argv], capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "e").exists()
