"""The Generator: the one decode loop. Continuation without a new prefill, rewind, ragged appends,
eos handling, and the backend registry's refusal of options it does not know."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cqil
from cqil.errors import CqilError
from engine_util import assert_one_line_error, compile_engine

FIXTURE = Path(__file__).parent / "fixtures" / "small-llama"
PROMPT = [1, 400, 12, 77, 905, 33, 6, 300]
TURN = [52, 17, 1000, 8]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-engines")
    return {name: cqil.load(compile_engine(FIXTURE, root / name, max_seq_len=96, dtype="float32", **opts), threads=1)
            for name, opts in {"p1": dict(p=1), "p2_d1": dict(p=2, start=2, end=10, bypass=1)}.items()}


def run(gen) -> list[int]:
    out = []
    while not gen.done:
        out.append(int(gen.next_tokens()[0]))
    return out


@pytest.mark.parametrize("name", ["p1", "p2_d1"])
def test_continued_conversation_equals_fresh_generate(engines, name):
    engine = engines[name]
    gen = engine.generator([PROMPT], max_new_tokens=8)
    first = run(gen)
    assert gen.tokens == [PROMPT + first] == engine.generate([PROMPT], max_new_tokens=8)
    gen.append_tokens([TURN])  # no new prefill: the last chosen token and the turn go in one step
    assert gen.cache[0].length == len(PROMPT) + len(first) + len(TURN)
    second = run(gen)
    history = PROMPT + first + TURN
    assert gen.tokens == [history + second]
    assert engine.generate([history], max_new_tokens=8) == [history + second]


def test_rewind_then_append_reproduces_the_step(engines):
    engine = engines["p2_d1"]
    gen = engine.generator([PROMPT], max_new_tokens=20)
    chosen = [int(gen.next_tokens()[0]) for _ in range(5)]  # t1..t4 fed, t5 chosen
    logits_before_t5 = gen.logits.copy()
    gen.rewind(3)  # drops t5 (chosen), t4 and t3
    assert gen.tokens == [PROMPT + chosen[:2]] and gen.logits is None
    with pytest.raises(CqilError, match="append tokens first"):
        gen.next_tokens()
    gen.append_tokens([chosen[2:4]])
    np.testing.assert_allclose(gen.logits, logits_before_t5, atol=1e-5, rtol=0)
    assert int(gen.next_tokens()[0]) == chosen[4]
    with pytest.raises(CqilError, match="rewind: n must be in"):
        gen.rewind(gen.length + 1)


def test_ragged_batch_with_eos(engines):
    """Rows finish at their own eos; later they get pad tokens, fed with mask 0, so their history stays clean."""
    engine = engines["p1"]
    rows = [PROMPT, PROMPT[:3]]
    greedy = engine.generate(rows, max_new_tokens=12)
    eos = greedy[1][3 + 2]  # row 1's third new token ends row 1
    gen = engine.generator(rows, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    steps = []
    while not gen.done:
        steps.append(gen.next_tokens().tolist())
    assert gen.tokens[1] == greedy[1][:3 + 3]  # up to and including its eos
    assert all(s[1] == 0 for s in steps[3:])  # padding afterwards
    cut = next((i for i, t in enumerate(greedy[0][len(PROMPT):]) if t == eos), None)
    assert gen.tokens[0] == greedy[0][:len(PROMPT) + (12 if cut is None else cut + 1)]
    assert gen.tokens == engine.generate(rows, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)


def test_ragged_append(engines):
    """Rows may gain different numbers of tokens in one append (left-padded within the chunk)."""
    engine = engines["p1"]
    gen = engine.generator([PROMPT, PROMPT[:4]], max_new_tokens=4)
    firsts = [run_row for run_row in zip(*[gen.next_tokens().tolist() for _ in range(4)])]
    gen.append_tokens([TURN, TURN[:1]])
    both = [list(r) for r in zip(*[gen.next_tokens().tolist() for _ in range(4)])]
    for b, prompt, turn in ((0, PROMPT, TURN), (1, PROMPT[:4], TURN[:1])):
        history = prompt + list(firsts[b]) + turn
        assert gen.tokens[b] == history + both[b]
        assert engine.generate([history], max_new_tokens=4) == [history + both[b]]


def test_generator_limits(engines):
    engine = engines["p1"]
    with pytest.raises(CqilError, match="exceeds the engine's max_seq_len 96"):
        engine.generator([PROMPT], max_new_tokens=90)
    gen = engine.generator([PROMPT], max_new_tokens=2)
    run(gen)
    with pytest.raises(CqilError, match="the generator is done"):
        gen.next_tokens()
    with pytest.raises(CqilError, match="got 2 row"):
        gen.append_tokens([TURN, TURN])
    long = engine.generator([PROMPT])  # no max_new_tokens: done at max_seq_len
    assert len(run(long)) == 96 - len(PROMPT)


def test_backend_refuses_options_it_does_not_take(engines, capsys):
    engine_dir = engines["p1"].dir
    with pytest.raises(CqilError) as err:
        cqil.load(engine_dir, decode="static")
    assert str(err.value) == ("backend onnxruntime does not take option(s) decode (it takes: devices, io_binding, "
                              "tensorrt_ep)")
    with pytest.raises(CqilError, match=r"unknown runtime backend 'tflite' \(available: onnxruntime, torch"):
        cqil.load(engine_dir, backend="tflite")
    from cqil.cli_util import run_main

    code = run_main("demo", lambda argv: cqil.load(engine_dir, threads=1, decode="graph"))
    assert_one_line_error(code, capsys.readouterr().err, "does not take option(s) decode")


def test_closed_engine_refuses_work(engines, tmp_path):
    engine = cqil.load(engines["p1"].dir, threads=1)
    engine.close()
    with pytest.raises(CqilError, match="it is closed"):
        engine.logits([PROMPT])
