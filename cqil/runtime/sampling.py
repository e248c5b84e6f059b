"""Next-token choice: the sampling parameters users pass to vLLM / OpenAI, and pure functions of one
row's logits, its tokens so far and a random generator.

    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=3)
    token = choose(logits_row, params, context=row_tokens, output=new_tokens, rng=params.rng())

What `choose` does, in this order (vLLM's V1 sampler order):

1. penalties on the logits: `repetition_penalty` r over every token of the context (prompt and
   output): a positive logit is divided by r, a negative one multiplied (HF / vLLM); then, over the
   output tokens only, `logit -= frequency_penalty * count + presence_penalty * (count > 0)` (OpenAI);
2. `temperature` 0 (below 1e-5) is greedy: the argmax of the penalised logits; else divide by it;
3. `min_p`: drop tokens whose probability is below min_p times the most likely one's;
4. `top_k` (0 or -1: off): keep the tokens scoring at least the k-th best (ties kept);
5. `top_p`: keep the smallest most-likely prefix whose mass reaches top_p (at least one token);
6. renormalise and draw with `rng`.

Logprobs (`logprobs_of`) are those of the model's own distribution: log_softmax of the raw logits,
before penalties and temperature, as vLLM reports them by default.

`seed`: a row with seed s draws from `numpy.random.default_rng(s)`; the i-th of n rows of one
request (or of one seeded legacy batch) uses seed s + i, so a row's draws never depend on the
rows beside it. Not here: `stop` strings (text: cqil.runtime.detokenize) and eos handling
(cqil.runtime.generator), though their parameters travel in the same value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from cqil.errors import CqilError

GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing by it would overflow)
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the `top` most likely alternatives [(id, logprob)]."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation; validated on creation (names as in the OpenAI API)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None  # None: until a stop, or the engine's max_seq_len
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    seed: int | None = None

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _number("temperature", self.temperature, lo=0)
        _number("top_p", self.top_p, lo=0, hi=1, lo_open=True)
        _integer("top_k", self.top_k, lo=-1)
        _number("min_p", self.min_p, lo=0, hi=1)
        _number("repetition_penalty", self.repetition_penalty, lo=0, lo_open=True)
        _number("presence_penalty", self.presence_penalty, lo=-2, hi=2)
        _number("frequency_penalty", self.frequency_penalty, lo=-2, hi=2)
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, lo=1)
        if not all(isinstance(s, str) and s for s in stop):
            raise CqilError(f"stop must be a non-empty string or a list of them, got {self.stop!r:.60}")
        for t in self.stop_token_ids:
            _integer("stop_token_ids item", t, lo=0)
        if not isinstance(self.ignore_eos, bool):
            raise CqilError(f"ignore_eos must be true or false, got {self.ignore_eos!r:.40}")
        _integer("n", self.n, lo=1)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.seed is not None:
            _integer("seed", self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the raw logits: the batch can take one argmax."""
        return self.greedy and not self.penalised

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    def rng(self, offset: int = 0) -> np.random.Generator:
        """This row's random generator: seeded with seed + offset, or fresh entropy."""
        return np.random.default_rng(None if self.seed is None else (self.seed + offset) % 2**64)

    @classmethod
    def from_generation_config(cls, config: dict) -> "SamplingParams":
        """Defaults from a generation_config.json: the sampling keys it holds override OpenAI's defaults
        (temperature 1, as vLLM does); an explicit `"do_sample": false` makes the default greedy."""
        keys = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
        found = {ours: config[theirs] for theirs, ours in keys.items() if config.get(theirs) is not None}
        if config.get("do_sample") is False:
            found["temperature"] = 0.0
        try:
            return cls(**found)
        except CqilError as e:
            raise CqilError(f"generation_config.json: {e}") from None


def _number(name, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise CqilError(f"{name} must be a number, got {value!r:.40}")
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        lower = f"> {lo}" if lo_open else f">= {lo}"
        raise CqilError(f"{name} must be {lower}" + (f" and <= {hi}" if hi is not None else "") + f", got {value}")


def _integer(name, value, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CqilError(f"{name} must be an integer, got {value!r:.40}")
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise CqilError(f"{name} must be {bounds}, got {value}")


def check_sampling(temperature: float, top_k: int, top_p: float):
    """The checks of `Engine.generate`'s own sampling keywords (greedy is do_sample=False there)."""
    if not temperature > 0:
        raise CqilError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise CqilError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise CqilError(f"top_p must be in (0, 1], got {top_p}")


def legacy_params(do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int | None = None) -> SamplingParams:
    """SamplingParams of `generate`'s keywords (do_sample, temperature, top_k, top_p, seed)."""
    check_sampling(temperature, top_k, top_p)
    return SamplingParams(temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p, seed=seed)


# -- the pure functions -------------------------------------------------------------------------


def penalise(logits: np.ndarray, params: SamplingParams, context, output) -> np.ndarray:
    """Step 1: logits [V] -> float64 scores [V] with the repetition / frequency / presence penalties."""
    scores = logits.astype(np.float64)  # a copy
    if params.repetition_penalty != 1 and len(context):
        seen = np.unique(np.asarray(context, np.int64))
        s = scores[seen]
        scores[seen] = np.where(s > 0, s / params.repetition_penalty, s * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and len(output):
        counts = np.bincount(np.asarray(output, np.int64), minlength=scores.shape[0])[:scores.shape[0]]
        scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return scores


def probabilities(scores: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Steps 3-5 after the temperature: scores [V] -> the distribution to draw from [V]."""
    scores = scores / params.temperature
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.min_p > 0:
        probs = np.where(probs < params.min_p * probs.max(), 0.0, probs)
    if params.top_k > 0 and params.top_k < probs.shape[0]:
        kth = np.partition(probs, -params.top_k)[-params.top_k]
        probs = np.where(probs < kth, 0.0, probs)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order] / probs.sum()
        drop = np.zeros(probs.shape, bool)
        drop[order] = np.cumsum(sorted_probs) - sorted_probs >= params.top_p
        probs = np.where(drop, 0.0, probs)
    return probs / probs.sum()


def choose(logits: np.ndarray, params: SamplingParams, context=(), output=(), rng: np.random.Generator | None = None) -> int:
    """One row's next token from its logits [V]; `context`: every token of the row so far (prompt and
    output), `output`: the tokens generated in this turn."""
    if params.plain_greedy:
        return int(logits.argmax())
    scores = penalise(logits, params, context, output) if params.penalised else logits.astype(np.float64)
    if params.greedy:
        return int(scores.argmax())
    p = probabilities(scores, params)
    return int((rng or np.random.default_rng()).choice(p.shape[0], p=p))


def logprobs_of(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """log_softmax of the raw logits [V]: the chosen token's value and the `top` best [(id, logprob)]."""
    x = logits.astype(np.float64)
    logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    best = ()
    if top:
        ids = np.argpartition(-logp, top - 1)[:top] if top < logp.shape[0] else np.arange(logp.shape[0])
        ids = ids[np.lexsort((ids, -logp[ids]))]  # most likely first, ties by id
        best = tuple((int(i), float(logp[i])) for i in ids)
    return TokenLogprob(int(token), float(logp[token]), best)
