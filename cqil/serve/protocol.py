"""The OpenAI wire format: requests parsed into `Job`s, results and stream chunks built as JSON.

Requests (`parse_request`) take OpenAI's fields and vLLM's sampling extras (`top_k`, `min_p`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos`, which the openai client sends as
`extra_body`); `null` means "not given". Fields that would change the output in ways cqil does not
implement (`echo`, `suffix`, `best_of` > n, `logit_bias`, tools, a non-text `response_format`)
are refused rather than ignored; bookkeeping fields (`user`, `metadata`, `store`, ...) are ignored.
Every refusal is an `ApiError`: a status and OpenAI's error object,

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Responses follow OpenAI's objects: `text_completion` and `chat.completion`, and for `stream: true`
the chunks (`text_completion` again, `chat.completion.chunk` with `delta`s), with `usage` in the
final chunk when `stream_options.include_usage` is set.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from cqil.errors import CqilError
from cqil.runtime.chat import render
from cqil.runtime.completion import encode, fit_max_tokens, request_params, rows_of
from cqil.runtime.detokenize import token_text
from cqil.runtime.sampling import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "n", "seed")


@dataclass
class Job:
    """One request, ready for the batcher: its prompts as token ids and one SamplingParams per row."""
    kind: str  # "completion" or "chat"
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    rows: list[tuple[list[int], SamplingParams]] = field(default_factory=list)  # prompt-major, n per prompt
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = 0


def parse_request(kind: str, body, service) -> Job:
    """A request body (parsed JSON) -> a Job, or an ApiError (400) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", service.model_name)
    if model != service.model_name:
        raise ApiError(400, f"The model `{model}` does not exist; this server has `{service.model_name}`",
                       param="model", code="model_not_found")
    _refuse_unsupported(kind, body)
    given = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        given["max_tokens"] = body["max_completion_tokens"]
    logprobs = _logprobs(kind, body)
    if logprobs is not None:
        given["logprobs"] = logprobs
    try:
        params = request_params(service.engine, given, chat=kind == "chat")
    except CqilError as e:
        raise ApiError(400, str(e), param=str(e).split(" ")[0] if str(e).split(" ")[0] in given else None) from None
    bad_ids = [t for t in params.stop_token_ids if t >= service.engine.config.vocab_size]
    if bad_ids:
        raise ApiError(400, f"stop_token_ids {bad_ids[:5]} are outside the vocabulary", param="stop_token_ids")
    prompts = _prompts(kind, body, service)
    if len(prompts) * params.n > service.max_batch:
        raise ApiError(400, f"the request needs {len(prompts) * params.n} sequences (prompts x n); this server "
                            f"decodes at most {service.max_batch} at once (--max-batch)", param="n")
    try:
        rows = [(ids, fit_max_tokens(service.engine, p, len(ids), explicit="max_tokens" in given))
                for ids, p in rows_of(prompts, params)]
    except CqilError as e:
        raise ApiError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt") from None
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r:.40}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Job(kind, model, prompts, params, rows, stream, bool(options.get("include_usage")),
               f"{prefix}-{uuid.uuid4().hex}", int(time.time()))


def _refuse_unsupported(kind: str, body: dict):
    def refuse(name, what):
        raise ApiError(400, f"{name}: {what} is not supported by cqil-serve", param=name)

    if body.get("logit_bias"):
        refuse("logit_bias", "a logit bias")
    if kind == "completion":
        if body.get("echo"):
            refuse("echo", "echoing the prompt")
        if body.get("suffix") is not None:
            refuse("suffix", "a suffix")
        if body.get("best_of") not in (None, body.get("n") or 1):
            refuse("best_of", "best_of other than n")
    else:
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if body.get(name) not in (None, [], "none"):
                refuse(name, "tool calling")
        fmt = body.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            refuse("response_format", "a response format other than text")


def _logprobs(kind: str, body: dict) -> int | None:
    if kind == "completion":
        value = body.get("logprobs")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= MAX_LOGPROBS):
            raise ApiError(400, f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {value!r:.40}",
                           param="logprobs")
        return value
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(400, f"logprobs must be true or false, got {wanted!r:.40}", param="logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {top!r:.40}",
                           param="top_logprobs")
        if not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def _prompts(kind: str, body: dict, service) -> list[list[int]]:
    try:
        if kind == "chat":
            if "messages" not in body:
                raise ApiError(400, "messages is required", param="messages")
            return [render(service.tokenizer, body["messages"])]
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(400, "prompt is required", param="prompt")
        if isinstance(prompt, str):
            return [encode(service.tokenizer, prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [encode(service.tokenizer, p) for p in prompt]
        if isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
            return [_checked_ids(prompt, service)]
        if (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
                and all(_is_id(t) for p in prompt for t in p)):
            return [_checked_ids(p, service) for p in prompt]
    except CqilError as e:
        raise ApiError(400, str(e), param="messages" if kind == "chat" else "prompt") from None
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                        "token ids (none empty)", param="prompt")


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _checked_ids(ids: list[int], service) -> list[int]:
    vocab = service.engine.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"prompt token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="prompt")
    return list(ids)


# -- responses --------------------------------------------------------------------------------


def usage(job: Job, outputs) -> dict:
    prompt = sum(len(ids) for ids in job.prompts)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(job: Job, object_name: str) -> dict:
    return {"id": job.id, "object": object_name, "created": job.created, "model": job.model}


def completion_logprobs(tokenizer, logprobs, offset: int = 0) -> dict:
    """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_text(tokenizer, lp.token) for lp in logprobs]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(tokenizer, i): v for i, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def chat_logprobs(tokenizer, logprobs) -> dict:
    def entry(token, value):
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in logprobs]}


def response(job: Job, outputs, tokenizer) -> dict:
    """The whole (not streamed) answer."""
    choices = []
    for i, out in enumerate(outputs):
        wants = out.params.logprobs is not None
        if job.kind == "chat":
            choices.append({"index": i, "message": {"role": "assistant", "content": out.text},
                            "logprobs": chat_logprobs(tokenizer, out.logprobs) if wants else None,
                            "finish_reason": out.finish_reason})
        else:
            choices.append({"index": i, "text": out.text, "finish_reason": out.finish_reason,
                            "logprobs": completion_logprobs(tokenizer, out.logprobs) if wants else None})
    kind = "chat.completion" if job.kind == "chat" else "text_completion"
    return {**_head(job, kind), "choices": choices, "usage": usage(job, outputs)}


def chunk(job: Job, index: int, text: str | None, finish_reason: str | None, logprobs=None, tokenizer=None,
          offset: int = 0, role: bool = False) -> dict:
    """One streamed piece of choice `index`: new text (and its tokens' logprobs), or its end."""
    if job.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": chat_logprobs(tokenizer, logprobs) if logprobs else None}
        body = {**_head(job, "chat.completion.chunk"), "choices": [choice]}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason,
                  "logprobs": completion_logprobs(tokenizer, logprobs, offset) if logprobs else None}
        body = {**_head(job, "text_completion"), "choices": [choice]}
    if job.include_usage:
        body["usage"] = None
    return body


def usage_chunk(job: Job, outputs) -> dict:
    kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    return {**_head(job, kind), "choices": [], "usage": usage(job, outputs)}
