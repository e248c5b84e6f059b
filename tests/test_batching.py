"""Continuous batching on the Generator: rows join (`merge`) and leave (`select`) between steps, and
each row gets exactly the tokens it gets alone; the KV-cache surgery behind it (`select`, `merge`,
`drop_front`) on the ONNX form (ConcatCache) and on the torch backend's buffers (eager and static
decode)."""

from __future__ import annotations

import numpy as np
import pytest

import cqil
from cqil.errors import CqilError
from cqil.runtime.generator import Generator
from cqil.runtime.sampling import SamplingParams
from engine_util import STD

PROMPTS = [[5, 7, 9, 11, 13], [3, 4], [20, 21, 22], list(range(30, 52))]  # the last one is longer than the batch
GREEDY = SamplingParams(temperature=0, max_tokens=30)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama", init_std=STD)
    out = cqil.compile(ckpt, tmp_path_factory.mktemp("batching") / "p2", p=2, start=1, end=3, bypass=1,
                       formats=("onnx", "torch"), max_seq_len=64, progress=False, log=lambda m: None)
    opened = {"onnxruntime": cqil.load(out, threads=1),
              "torch-eager": cqil.load(out, threads=1, backend="torch", decode="eager"),
              "torch-static": cqil.load(out, threads=1, backend="torch", decode="static")}
    yield opened
    for e in opened.values():
        e.close()


def alone(engine, prompt, steps, params=GREEDY) -> list[int]:
    gen = Generator(engine, [prompt], params=params)
    return [int(gen.next_tokens()[0]) for _ in range(steps)]


def steps(gen, n, record):
    for _ in range(n):
        for row, token in zip(record["rows"], gen.next_tokens().tolist()):
            record["out"][row].append(token)


@pytest.mark.parametrize("name", ["onnxruntime", "torch-eager", "torch-static"])
def test_rows_joining_and_leaving_get_what_they_get_alone(engines, name):
    engine = engines[name]
    record = {"rows": [0, 1], "out": {i: [] for i in range(len(PROMPTS))}}
    gen = Generator(engine, PROMPTS[:2], params=GREEDY)
    steps(gen, 3, record)
    gen.merge(Generator(engine, [PROMPTS[2]], params=GREEDY))  # joins a running batch
    record["rows"].append(2)
    steps(gen, 2, record)
    gen.select([0, 2])  # row 1 leaves unfinished
    record["rows"] = [0, 2]
    steps(gen, 3, record)
    gen.merge(Generator(engine, [PROMPTS[3]], params=GREEDY))  # longer than the batch: the batch is padded
    record["rows"].append(3)
    steps(gen, 4, record)
    width = gen.length
    gen.select([0, 1])  # the longest row leaves: the columns in front of the others go
    record["rows"] = [0, 2]
    assert gen.length < width and gen.cache[0].length == gen.length - 1  # a chosen token is not fed yet
    steps(gen, 3, record)
    for row, tokens in record["out"].items():
        assert tokens == alone(engine, PROMPTS[row], len(tokens)), f"row {row}"


def test_sampled_rows_draw_the_same_beside_others(engines):
    engine = engines["onnxruntime"]
    sampled = SamplingParams(temperature=1.0, top_k=40, seed=11, max_tokens=30)
    gen = Generator(engine, [PROMPTS[0]], params=[GREEDY])
    first = [int(gen.next_tokens()[0])]
    gen.merge(Generator(engine, [PROMPTS[1]], params=[sampled]))
    out = [gen.next_tokens().tolist() for _ in range(8)]
    assert first + [o[0] for o in out] == alone(engine, PROMPTS[0], 9)
    assert [o[1] for o in out] == alone(engine, PROMPTS[1], 8, sampled)


@pytest.mark.parametrize("name", ["onnxruntime", "torch-eager"])
def test_cache_surgery_keeps_each_rows_keys(engines, name):
    """After merge, select and drop_front, every row's keys/values are its own, right-aligned."""
    engine = engines[name]
    a, b = Generator(engine, [PROMPTS[0]], params=GREEDY), Generator(engine, [PROMPTS[2]], params=GREEDY)
    ref_a = {k: np.asarray(v).copy() for k, v in a.cache[1].arrays().items()}
    ref_b = {k: np.asarray(v).copy() for k, v in b.cache[1].arrays().items()}
    a.merge(b)
    cache = a.cache[1]
    assert cache.length == len(PROMPTS[0])
    pad = len(PROMPTS[0]) - len(PROMPTS[2])
    for k, v in cache.arrays().items():
        v = np.asarray(v)
        np.testing.assert_array_equal(v[0], ref_a[k][0])
        np.testing.assert_array_equal(v[1, :, pad:], ref_b[k][0])
        assert not v[1, :, :pad].any()
    a.select([1])  # row 0 leaves: the padding in front of row 1 goes too
    assert cache.length == len(PROMPTS[2]) and a.length == len(PROMPTS[2])
    for k, v in cache.arrays().items():
        np.testing.assert_array_equal(np.asarray(v)[0], ref_b[k][0])


def test_select_and_merge_refuse_bad_input(engines):
    engine = engines["onnxruntime"]
    gen = Generator(engine, PROMPTS[:2], params=GREEDY)
    with pytest.raises(CqilError, match="select: rows must be"):
        gen.select([])
    with pytest.raises(CqilError, match="select: rows must be"):
        gen.select([2])
    with pytest.raises(CqilError, match="another one on the same engine"):
        gen.merge(gen)
    other = Generator(engine, [PROMPTS[0]], params=GREEDY)
    other.next_tokens()
    other.rewind(2)
    with pytest.raises(CqilError, match="after a rewind"):
        gen.merge(other)
