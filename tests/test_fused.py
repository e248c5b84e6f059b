"""ONNX Runtime's fused operators, the in-place KV cache, and int4/int8 weights, on the fixture model.

- fused engines (the default: GroupQueryAttention, RotaryEmbedding over cqil's own positions, the
  norms) give the plain engine's (`--no-fuse`) logits within 1e-4 and its greedy
  tokens, for p=1, p=2 with bypass and p=4, batch 2 with left padding, prefill and decode;
- their KV cache is one buffer per layer, bound as past and present: a decode step deep into the
  context writes into the same buffers and allocates nothing cache-sized;
- continuous batching (merge, select, drop_front) keeps a row's tokens with the buffer cache;
- int8 / int4 engines: perplexity and teacher-forced greedy agreement against the fp32 engine within
  the bounds docs/quality.md reports; the manifest and cqil-check know they are quantized.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import cqil
from cqil.runtime.kv_cache import BufferCache
from cqil.verify import check_engine
from engine_util import compile_engine

FIXTURE = Path(__file__).parent / "fixtures" / "small-llama"
PLANS = {"p1": dict(p=1), "p2_d1": dict(p=2, start=2, end=10, bypass=1), "p4": dict(p=4, start=2, end=10)}
PROMPTS = [[1, 400, 12, 77, 905, 33, 6, 300, 18, 2049], [1, 42, 43, 44]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    built = {}

    def get(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in built:
            folder = root / f"{name}-{'-'.join(f'{k}{v}' for k, v in sorted(options.items())) or 'fused'}"
            built[key] = compile_engine(FIXTURE, folder, dtype="float32", max_seq_len=1100, **PLANS[name], **options)
        return built[key]

    return get


def steps(engine, n: int, rows=PROMPTS) -> tuple[list[np.ndarray], list[list[int]]]:
    """The logits of the prefill and n greedy decode steps, and the tokens."""
    gen = engine.generator(rows, max_new_tokens=n)
    logits = [gen.logits.copy()]
    while not gen.done:
        gen.next_tokens()
        if not gen.done:
            gen.flush()
            logits.append(gen.logits.copy())
    return logits, gen.tokens


@pytest.mark.parametrize("name", list(PLANS))
def test_fused_engine_matches_the_plain_one(engines, name):
    fused, plain = cqil.load(engines(name), threads=1), cqil.load(engines(name, fuse=False), threads=1)
    assert fused.manifest["fused"] and not plain.manifest["fused"]
    assert fused.manifest["onnx_ops"]["attention"] == 12  # every layer's attention fused
    ops = {n.op_type for f in fused.manifest["files"] if f.endswith(".onnx")
           for n in __import__("onnx").load(str(engines(name) / f), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops
    assert not {"Softmax", "Neg", "Transpose"} & ops  # no exported attention, rotary or head views left
    got, got_tokens = steps(fused, 24)
    want, want_tokens = steps(plain, 24)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) <= 1e-4
    assert got_tokens == want_tokens
    full = fused.logits(PROMPTS)  # every position, padding rows masked the same way
    real = np.array([[1] * 10, [0] * 6 + [1] * 4]) == 1
    assert float(np.abs(full - plain.logits(PROMPTS))[real].max()) <= 1e-4


def test_decode_writes_the_cache_in_place(engines):
    """A step at position ~1000 writes into the same buffers and allocates no cache-sized array;
    the plain engine's step allocates new presents as long as the whole cache."""
    for fused, options in ((True, {}), (False, {"fuse": False})):
        engine = cqil.load(engines("p1", **options), threads=1)
        gen = engine.generator([list(range(1, 1001))], max_new_tokens=4)
        gen.next_tokens()
        gen.flush()
        cache = gen.cache[0]
        kv_bytes = cache.arrays()["present.0.key"].nbytes  # one layer's keys: [1, kv_heads, ~1000, head_dim]
        before = {k: _address(v) for k, v in getattr(cache, "buffers", {}).items()}
        tracemalloc.start()
        gen.next_tokens()
        gen.flush()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if fused:
            assert isinstance(cache, BufferCache) and cache.length == 1002
            assert {k: _address(v) for k, v in cache.buffers.items()} == before
            assert peak < kv_bytes / 2, f"a fused decode step allocated {peak} bytes (a cache layer is {kv_bytes})"
        else:
            assert peak > 2 * 12 * kv_bytes  # every layer's key and value, copied


def _address(array) -> int:
    return array.__array_interface__["data"][0]


def test_continuous_batching_with_the_buffer_cache(engines):
    engine = cqil.load(engines("p2_d1"), threads=1)
    alone = [engine.generate([p], max_new_tokens=12) for p in PROMPTS]
    running = engine.generator([PROMPTS[0]], max_new_tokens=12)
    for _ in range(3):
        running.next_tokens()
    running.merge(engine.generator([PROMPTS[1]], max_new_tokens=12))  # joins three steps late
    while not running.finished[0]:
        running.next_tokens()
    running.select([1])  # row 0 leaves; the columns only it used go
    while not running.done:
        running.next_tokens()
    assert type(running.cache[0]).__name__ == "BufferCache"
    assert running.tokens == alone[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind, ppl_bound, agree_bound", [("int8", 0.005, 0.97), ("int4", 0.02, 0.85)])
def test_quantized_engines(engines, kind, ppl_bound, agree_bound, capsys):
    from cqil.quality.cli import eval_main

    q, ref = engines("p2_d1", quant=kind), engines("p2_d1")
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["quantization"]["kind"] == kind and manifest["onnx_ops"]["quantized"] == 49
    ppl = {}
    for name, folder in ((kind, q), ("fp32", ref)):
        assert eval_main([str(folder), "--data", str(FIXTURE / "heldout.txt"), "--max-tokens", "4096", "--seq-len",
                          "128", "--stride", "64", "--json", "--quiet"]) == 0
        ppl[name] = json.loads(capsys.readouterr().out)["perplexity"]
    assert abs(ppl[kind] / ppl["fp32"] - 1) <= ppl_bound, ppl
    quantized, plain = cqil.load(q, threads=1), cqil.load(ref, threads=1)
    a, b = quantized.generator(PROMPTS), plain.generator(PROMPTS)
    same = 0
    for _ in range(40):  # teacher-forced: both read the fp32 engine's choices
        choice = b.logits.argmax(-1)
        same += int((a.logits.argmax(-1) == choice).sum())
        a.append_tokens(choice[:, None])
        b.append_tokens(choice[:, None])
    assert same / 80 >= agree_bound
    report = check_engine(quantized, FIXTURE, steps=8)
    assert report["passed"] and report["quantization"] == kind and report["top1_agreement"] >= agree_bound


@pytest.mark.parametrize("io_binding", [True, False])
def test_a_batched_append_runs_row_by_row(engines, io_binding):
    """ONNX Runtime's GroupQueryAttention refuses several new tokens after a past at batch > 1; the
    segment runs such a step one row at a time (into the same buffers), with the plain engine's result."""
    results = []
    for engine in (cqil.load(engines("p2_d1"), threads=1, io_binding=io_binding),
                   cqil.load(engines("p2_d1", fuse=False), threads=1)):
        gen = engine.generator(PROMPTS, max_new_tokens=6)
        gen.next_tokens()
        gen.append_tokens([[5, 6, 7, 8], [9, 10]])  # ragged: row 1 is left-padded within the chunk
        logits = gen.logits.copy()
        while not gen.done:
            gen.next_tokens()
        results.append((logits, gen.tokens))
    (fused_logits, fused_tokens), (plain_logits, plain_tokens) = results
    assert float(np.abs(fused_logits - plain_logits).max()) <= 1e-4
    assert fused_tokens == plain_tokens


def test_norms_with_shared_weights_are_fused(tiny_checkpoint, tmp_path):
    """A fresh checkpoint's norm weights are all ones: the exporter keeps one initializer and hands it
    to the other layers through Identity nodes; every norm is still fused."""
    import onnx

    layers = 4
    out = compile_engine(tiny_checkpoint("llama", num_hidden_layers=layers), tmp_path / "engine", dtype="float32", p=1)
    graph = onnx.load(str(out / "rank0" / "seg0.onnx"), load_external_data=False).graph
    assert sum(t.name.endswith("layernorm.weight") for t in graph.initializer) < 2 * layers  # shared
    ops = [n.op_type for n in graph.node]
    assert ops.count("SkipSimplifiedLayerNormalization") + ops.count("SimplifiedLayerNormalization") == 2 * layers + 1
    assert "ReduceMean" not in ops


def test_decode_rebinds_only_what_changed(engines):
    """A segment keeps its IO binding between steps: a decode step binds the new ids, mask, positions
    and outputs, not the KV buffers again; generators stepped in turn still get their own tokens."""
    engine = cqil.load(engines("p1"), threads=1)
    segment = engine.segments[0]["seg0"]
    rank, bound = segment.rank, []
    bind_input = rank.bind_input
    rank.bind_input = lambda binding, name, value: (bound.append(name), bind_input(binding, name, value))
    gen = engine.generator([PROMPTS[0]], max_new_tokens=4)
    gen.next_tokens()
    gen.flush()
    bound.clear()
    gen.next_tokens()
    gen.flush()
    assert sorted(bound) == ["attention_mask", "input_ids", "position_ids"]
    rank.bind_input = bind_input

    alone = [engine.generate([p], max_new_tokens=10) for p in PROMPTS]
    gens = [engine.generator([p], max_new_tokens=10) for p in PROMPTS]
    while not all(g.done for g in gens):
        for g in gens:
            if not g.done:
                g.next_tokens()
    assert [g.tokens for g in gens] == alone


@pytest.mark.parametrize("preset", ["llama3", "qwen2", "mistral"])
def test_every_family_fuses_to_the_plain_result(tiny_checkpoint, tmp_path, preset):
    """llama3's scaled rope, qwen2's q/k/v biases, mistral: every layer's attention and rotary are
    fused, and a ragged batch's prefill and decode give the plain engine's logits and tokens."""
    import onnx

    checkpoint = tiny_checkpoint(preset, init_std=0.2)
    fused, plain = (cqil.load(compile_engine(checkpoint, tmp_path / f"fuse{f}", dtype="float32", p=1, fuse=f,
                                             max_seq_len=64), threads=1) for f in (True, False))
    ops = [n.op_type for n in onnx.load(str(fused.dir / "rank0" / "seg0.onnx"), load_external_data=False).graph.node]
    layers = fused.config.num_layers
    assert ops.count("GroupQueryAttention") == layers and ops.count("RotaryEmbedding") == 2 * layers
    rows = [[5, 7, 9, 11, 13, 17, 19], [3, 4, 8]]
    (got, got_tokens), (want, want_tokens) = (steps(engine, 12, rows) for engine in (fused, plain))
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) <= 1e-4
    assert got_tokens == want_tokens
