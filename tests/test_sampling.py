"""Sampling parameters, each against a direct computation on the logits: the pure functions of
cqil.runtime.sampling on made-up logits, and the Generator on an engine's real logits (penalties,
min_p, logprobs, stop token ids, seeds, max_tokens) through a hand-written decode loop."""

from __future__ import annotations

import numpy as np
import pytest

import cqil
from cqil.errors import CqilError
from cqil.runtime.generator import Generator
from cqil.runtime.sampling import SamplingParams, choose, logprobs_of, penalise, probabilities
from engine_util import STD

V = 12
LOGITS = np.array([2.0, -1.0, 0.5, 3.0, -2.5, 1.0, 0.0, 2.9, -0.3, 1.5, -4.0, 0.2], np.float32)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


# -- the pure functions -------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    p = SamplingParams(repetition_penalty=1.3)
    out = penalise(LOGITS, p, context=[0, 1, 1, 4], output=[])
    expected = LOGITS.astype(np.float64).copy()
    expected[0] /= 1.3  # positive
    expected[[1, 4]] *= 1.3  # negative: pushed further down, once per token however often it occurs
    np.testing.assert_allclose(out, expected)


def test_frequency_and_presence_penalties_count_output_tokens():
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = penalise(LOGITS, p, context=[2, 2, 2], output=[3, 3, 7])
    expected = LOGITS.astype(np.float64).copy()
    expected[3] -= 0.5 * 2 + 0.25
    expected[7] -= 0.5 * 1 + 0.25  # prompt tokens (2) are not penalised by these two
    np.testing.assert_allclose(out, expected)


def test_temperature_min_p_top_k_top_p():
    x = LOGITS.astype(np.float64)
    probs = softmax(x / 0.7)
    np.testing.assert_allclose(probabilities(x, SamplingParams(temperature=0.7)), probs)
    kept = np.where(probs >= 0.2 * probs.max(), probs, 0)
    np.testing.assert_allclose(probabilities(x, SamplingParams(temperature=0.7, min_p=0.2)), kept / kept.sum())
    top3 = np.argsort(-x)[:3]
    k = np.zeros(V)
    k[top3] = probs[top3]
    np.testing.assert_allclose(probabilities(x, SamplingParams(temperature=0.7, top_k=3)), k / k.sum())
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    n = int(np.searchsorted(mass, 0.8) + 1)  # the smallest prefix reaching 0.8
    nucleus = np.zeros(V)
    nucleus[order[:n]] = probs[order[:n]]
    np.testing.assert_allclose(probabilities(x, SamplingParams(temperature=0.7, top_p=0.8)), nucleus / nucleus.sum())


def test_temperature_zero_is_greedy_after_penalties():
    assert choose(LOGITS, SamplingParams(temperature=0)) == 3
    # token 3 repeated: 3.0 / 2 = 1.5 falls behind token 7 (2.9)
    assert choose(LOGITS, SamplingParams(temperature=0, repetition_penalty=2.0), context=[3]) == 7


def test_draws_follow_the_distribution_and_the_seed():
    p = SamplingParams(temperature=1.5, top_k=5, seed=3)
    draws = [choose(LOGITS, p, rng=p.rng()) for _ in range(3)]
    assert draws == [choose(LOGITS, p, rng=p.rng()) for _ in range(3)]  # same seed, same draw
    rng = p.rng()
    many = np.bincount([choose(LOGITS, p, rng=rng) for _ in range(4000)], minlength=V) / 4000
    np.testing.assert_allclose(many, probabilities(LOGITS.astype(np.float64), p), atol=0.03)
    assert many[np.argsort(LOGITS)[:V - 5]].sum() == 0  # outside the top 5: never


def test_logprobs_are_the_raw_log_softmax():
    lp = logprobs_of(LOGITS, 5, top=3)
    ref = np.log(softmax(LOGITS.astype(np.float64)))
    assert lp.token == 5 and lp.logprob == pytest.approx(ref[5])
    assert [i for i, _ in lp.top] == [3, 7, 0] and [v for _, v in lp.top] == pytest.approx(ref[[3, 7, 0]])


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0), "top_p must be > 0 and <= 1"),
    (dict(top_k=-2), "top_k must be >= -1"),
    (dict(min_p=1.5), "min_p must be >= 0 and <= 1"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(presence_penalty=2.5), "presence_penalty must be >= -2 and <= 2"),
    (dict(frequency_penalty="1"), "frequency_penalty must be a number"),
    (dict(max_tokens=-1), "max_tokens must be >= 1"),
    (dict(max_tokens=2.0), "max_tokens must be an integer"),
    (dict(n=0), "n must be >= 1"),
    (dict(logprobs=21), r"logprobs must be in \[0, 20\]"),
    (dict(stop=[""]), "stop must be a non-empty string"),
    (dict(stop_token_ids=[-1]), "stop_token_ids item must be >= 0"),
    (dict(seed=True), "seed must be an integer"),
])
def test_bad_parameters_are_refused(fields, message):
    with pytest.raises(CqilError, match=message):
        SamplingParams(**fields)


def test_defaults_from_generation_config():
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    p = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                               "repetition_penalty": 1.1, "max_new_tokens": 64, "eos_token_id": 2})
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.6, 0.9, 20, 1.1, 64)
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.6}).greedy
    with pytest.raises(CqilError, match="generation_config.json: top_p must be"):
        SamplingParams.from_generation_config({"top_p": 7})


# -- on an engine: the Generator against a hand-written loop over the engine's logits --------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama", init_std=STD)
    out = cqil.compile(ckpt, tmp_path_factory.mktemp("sampling") / "p1", p=1, max_seq_len=64, progress=False,
                       log=lambda m: None)
    with cqil.load(out, threads=1) as e:
        yield e


PROMPT = [5, 9, 14, 5, 30, 31]


def by_hand(engine, params: SamplingParams, steps: int, rng=None):
    """Tokens and raw logits of a plain loop: full-sequence logits each step, the choice made here."""
    tokens, out, all_logits = list(PROMPT), [], []
    for _ in range(steps):
        logits = engine.logits([tokens])[0, -1]
        all_logits.append(logits)
        x = penalise(logits, params, tokens, out)
        if params.greedy:
            t = int(np.argmax(x))
        else:
            p = probabilities(x, params)
            t = int(rng.choice(engine.config.vocab_size, p=p))
        out.append(t)
        tokens.append(t)
    return out, all_logits


def run(engine, params, **kw):
    gen = Generator(engine, [PROMPT], params=[params], **kw)
    out = []
    while not gen.done:
        out.append(int(gen.next_tokens()[0]))
    return gen, out


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=12),
    SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=1.0, max_tokens=12),
], ids=["repetition", "frequency+presence"])
def test_penalties_on_engine_logits(engine, params):
    gen, out = run(engine, params)
    expected, _ = by_hand(engine, params, 12)
    assert out == expected
    assert out != run(engine, SamplingParams(temperature=0, max_tokens=12))[1]  # the penalty mattered


def test_sampling_with_min_p_top_k_top_p_and_seed(engine):
    params = SamplingParams(temperature=1.3, min_p=0.05, top_k=30, top_p=0.95, seed=5, max_tokens=10)
    _, out = run(engine, params)
    expected, _ = by_hand(engine, params, 10, rng=np.random.default_rng(5))
    assert out == expected
    assert run(engine, params)[1] == out and run(engine, params.replace(seed=6))[1] != out


def test_logprobs_on_engine_logits(engine):
    params = SamplingParams(temperature=0, logprobs=4, max_tokens=5)
    gen = Generator(engine, [PROMPT], params=[params])
    got = []
    while not gen.done:
        gen.next_tokens()
        got.append(gen.token_logprobs[0])
    _, logits = by_hand(engine, params, 5)
    for lp, x in zip(got, logits):
        ref = np.log(softmax(x.astype(np.float64)))
        assert lp.logprob == pytest.approx(ref[lp.token], abs=1e-4) and lp.token == int(np.argmax(x))
        assert [i for i, _ in lp.top] == list(np.argsort(-ref)[:4])
        assert [v for _, v in lp.top] == pytest.approx(ref[np.argsort(-ref)[:4]], abs=1e-4)


def test_stop_token_ids_and_max_tokens(engine):
    greedy = run(engine, SamplingParams(temperature=0, max_tokens=10))[1]
    gen, out = run(engine, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[greedy[3]]))
    cut = greedy.index(greedy[3])
    assert out == greedy[:cut + 1] and gen.finish_reasons == ["stop"]
    gen, out = run(engine, SamplingParams(temperature=0, max_tokens=4))
    assert out == greedy[:4] and gen.finish_reasons == ["length"]
    # eos from the Generator, ignore_eos per row
    gen, out = run(engine, SamplingParams(temperature=0, max_tokens=10), eos_token_id=greedy[2])
    assert out == greedy[:greedy.index(greedy[2]) + 1]
    gen, out = run(engine, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), eos_token_id=greedy[2])
    assert out == greedy
    with pytest.raises(CqilError, match="outside the vocabulary"):
        Generator(engine, [PROMPT], params=[SamplingParams(stop_token_ids=[10**6])])
    with pytest.raises(CqilError, match="exceeds the engine's max_seq_len 64"):
        Generator(engine, [PROMPT], params=[SamplingParams(max_tokens=60)])
