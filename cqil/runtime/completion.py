"""Text generation on top of the Generator: prompts in, text out, for `Engine.complete`, `cqil-run`,
chat and the server (cqil.serve), which all step their Generators through `advance`.

    outputs = [Output(params, tokenizer, prompt_ids) for each row]
    gen = Generator(engine, prompts, params=[o.params for o in outputs], eos_token_id=eos_ids(engine))
    while not gen.done:
        deltas = advance(gen, outputs)       # each row's new text this step ("" while held back)
    [o.text for o in outputs], [o.finish_reason for o in outputs]

An `Output` is one generated sequence (one Generator row): its tokens, its text (incremental, with
stop strings: cqil.runtime.detokenize), its logprobs and why it ended. Defaults come from the
engine's generation_config.json (`default_params`); `max_tokens` defaults to 16 for completions
(OpenAI's and vLLM's default) and to the rest of the context for chat.
"""

from __future__ import annotations

import json

from cqil.errors import CqilError
from cqil.runtime.detokenize import TextDecoder
from cqil.runtime.generator import Generator
from cqil.runtime.sampling import SamplingParams, TokenLogprob

COMPLETION_MAX_TOKENS = 16


class Output:
    """One generated sequence: a row of a Generator, seen as text."""

    def __init__(self, params: SamplingParams, tokenizer=None, prompt_ids=()):
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.decoder = TextDecoder(tokenizer, params.stop, context=prompt_ids) if tokenizer is not None else None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return self.decoder.text if self.decoder is not None else ""

    def _took(self, token: int, logprob: TokenLogprob | None, reason: str | None) -> tuple[str, str | None]:
        self.token_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        delta = ""
        if self.decoder is not None:
            delta = self.decoder.push(token)
            if self.decoder.stopped:
                reason = "stop"
            elif reason is not None:
                delta += self.decoder.finish()
        self.finish_reason = reason
        return delta, reason


def advance(gen: Generator, outputs: list[Output]) -> list[str]:
    """One step: choose every row's next token and hand it to the row's Output; returns each row's new
    text. A row whose text reached a stop string is finished in the Generator too."""
    tokens = gen.next_tokens()
    reasons, logprobs = gen.finish_reasons, gen.token_logprobs
    deltas = []
    for b, out in enumerate(outputs):
        if out.finish_reason is not None:
            deltas.append("")
            continue
        delta, reason = out._took(int(tokens[b]), logprobs[b], reasons[b])
        if reason is not None and reasons[b] is None:
            gen.finish([b], reason)
        deltas.append(delta)
    return deltas


def eos_ids(engine, tokenizer=None) -> list[int]:
    """Every end-of-sequence id the engine knows: tokenizer, generation_config.json, model config."""
    found = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    found.append(generation_config(engine).get("eos_token_id"))
    found.append(engine.config.eos_token_id)
    flat = []
    for e in found:
        flat += e if isinstance(e, list) else [e]
    return sorted({int(e) for e in flat if e is not None})


def generation_config(engine) -> dict:
    """The engine's generation_config.json ({} when it has none)."""
    path = engine.dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise CqilError(f"engine: {path} is not a valid JSON object")
    return config


def default_params(engine) -> SamplingParams:
    """The engine's sampling defaults: generation_config.json's sampling keys over OpenAI's."""
    return SamplingParams.from_generation_config(generation_config(engine))


def request_params(engine, overrides: dict, chat: bool = False) -> SamplingParams:
    """The engine's defaults with a request's parameters on top (unknown names are refused)."""
    unknown = sorted(set(overrides) - set(SamplingParams.__dataclass_fields__))
    if unknown:
        raise CqilError(f"unknown sampling parameter(s) {', '.join(unknown)} (known: "
                        f"{', '.join(SamplingParams.__dataclass_fields__)})")
    params = engine.generation_defaults.replace(**overrides)
    if params.max_tokens is None and not chat:
        params = params.replace(max_tokens=COMPLETION_MAX_TOKENS)
    return params


def fit_max_tokens(engine, params: SamplingParams, prompt_len: int, explicit: bool) -> SamplingParams:
    """max_tokens within the context: a default is cut to what is left; an explicit one must fit."""
    left = engine.max_seq_len - prompt_len
    if left < 1:
        raise CqilError(f"the prompt has {prompt_len} tokens; the engine's max_seq_len {engine.max_seq_len} leaves "
                        f"no room to generate")
    if params.max_tokens is None or (params.max_tokens > left and not explicit):
        return params.replace(max_tokens=left)
    if params.max_tokens > left:
        raise CqilError(f"the engine's max_seq_len is {engine.max_seq_len} tokens; the prompt ({prompt_len}) + "
                        f"max_tokens ({params.max_tokens}) = {prompt_len + params.max_tokens} exceed it")
    return params


def rows_of(prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], SamplingParams]]:
    """(prompt, params) of every row: each prompt n times, the i-th copy seeded with seed + i."""
    rows = []
    for ids in prompts:
        for i in range(params.n):
            rows.append((ids, params.replace(n=1, seed=None if params.seed is None else params.seed + i)))
    return rows


def generate_outputs(engine, prompts: list[list[int]], params: SamplingParams, tokenizer=None,
                     explicit_max_tokens: bool = True, on_delta=None) -> list[Output]:
    """Every prompt's n outputs (prompt-major), generated together in one batch."""
    rows = [(ids, fit_max_tokens(engine, p, len(ids), explicit_max_tokens)) for ids, p in rows_of(prompts, params)]
    outputs = [Output(p, tokenizer, ids) for ids, p in rows]
    gen = Generator(engine, [ids for ids, _ in rows], params=[o.params for o in outputs],
                    eos_token_id=eos_ids(engine, tokenizer) or None)
    while not gen.done:
        deltas = advance(gen, outputs)
        if on_delta is not None:
            on_delta(deltas)
    return outputs


def encode(tokenizer, prompt) -> list[int]:
    if not isinstance(prompt, str):
        raise CqilError(f"a prompt must be a string, got {type(prompt).__name__}")
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise CqilError("the prompt encodes to no tokens")
    return ids


def complete(engine, prompt, **params):
    """`Engine.complete`: text in, text out. A string gives a string (a list of n with n > 1); a list
    of strings gives one such result per string."""
    explicit = params.get("max_tokens") is not None
    sampling = request_params(engine, params)
    tokenizer = engine.tokenizer
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise CqilError("complete: no prompt")
    outputs = generate_outputs(engine, [encode(tokenizer, p) for p in prompts], sampling, tokenizer, explicit)
    texts = [o.text for o in outputs]
    n = sampling.n
    grouped = [texts[i:i + n] if n > 1 else texts[i] for i in range(0, len(texts), n)]
    return grouped[0] if isinstance(prompt, str) else grouped
