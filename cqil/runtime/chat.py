"""Chat: messages rendered with the engine's chat template, and conversations that keep their KV cache.

    engine.chat([{"role": "user", "content": "Hi"}], temperature=0)     # -> the assistant's reply
    chat = engine.start_chat(system="Answer briefly.")
    chat.send("Hi")                    # prefill the rendered conversation, generate the reply
    chat.send("And then?")             # only the new tokens are fed: the first turn's KV cache stays

The template is the tokenizer's (`chat_template` in tokenizer_config.json or chat_template.jinja,
which cqil-compile copies into the engine); a tokenizer without one gets `FALLBACK_TEMPLATE`
(Zephyr's layout: `<|role|>` lines, each message closed by the eos token), with a warning once.

A conversation re-renders the whole message list every turn and feeds only what differs from the
tokens it holds: it keeps the longest common prefix of the two (rewinding the rest, e.g. an
assistant reply that the template writes back differently from how it was generated) and appends
the remainder. A turn therefore gives the tokens a fresh run over the whole conversation gives.
"""

from __future__ import annotations

import logging

from cqil.errors import CqilError, first_line
from cqil.runtime.completion import Output, advance, eos_ids, fit_max_tokens, request_params
from cqil.runtime.generator import Generator

log = logging.getLogger("cqil")

FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
ROLES = ("system", "developer", "user", "assistant", "tool")
_warned: set[str] = set()


def check_messages(messages) -> list[dict]:
    """Messages as the template gets them: {"role", "content": str}; OpenAI's text parts are joined."""
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise CqilError("messages must be a list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise CqilError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise CqilError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r:.40}")
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if any(not isinstance(p, str) for p in parts):
                raise CqilError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                f"are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise CqilError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    if not out:
        raise CqilError("messages is empty")
    return out


def render(tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the conversation under the tokenizer's chat template (or the fallback)."""
    messages = check_messages(messages)
    template = None
    if not getattr(tokenizer, "chat_template", None):
        template = FALLBACK_TEMPLATE
        name = getattr(tokenizer, "name_or_path", "")
        if name not in _warned:
            _warned.add(name)
            log.warning("the tokenizer has no chat template; using cqil's fallback (Zephyr's layout)")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=template)
    except Exception as e:  # a template that raises (e.g. roles it refuses) is the request's problem
        raise CqilError(f"the chat template failed on these messages: {first_line(e)}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own bos
    if not ids:
        raise CqilError("the conversation renders to no tokens")
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Chat:
    """A conversation on one engine; its Generator (and so its KV cache) lives from turn to turn."""

    def __init__(self, engine, messages=(), system: str | None = None, **params):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.messages = ([{"role": "system", "content": system}] if system is not None else [])
        self.messages += check_messages(messages) if messages else []
        self.params = params
        self.gen: Generator | None = None
        self.fed = 0  # tokens the last turn fed to the model (the whole prompt on the first turn)

    def send(self, content: str, on_text=None, **params) -> str:
        """Add a user message and return the assistant's reply (also added to the messages)."""
        self.messages.append({"role": "user", "content": content})
        return self.respond(on_text=on_text, **params)

    def respond(self, on_text=None, **params) -> str:
        """The assistant's reply to the messages so far, added to them; `on_text(str)` gets it as it comes."""
        ids = render(self.tokenizer, self.messages)
        explicit = params.get("max_tokens", self.params.get("max_tokens")) is not None
        sampling = request_params(self.engine, {**self.params, **params}, chat=True)
        if sampling.n != 1:
            raise CqilError(f"a conversation has one reply per turn (n=1), got n={sampling.n}")
        sampling = fit_max_tokens(self.engine, sampling, len(ids), explicit)
        self._feed(ids, sampling)
        out = Output(sampling, self.tokenizer, ids)
        while not self.gen.done and out.finish_reason is None:
            delta = advance(self.gen, [out])[0]
            if delta and on_text is not None:
                on_text(delta)
        self.finish_reason = out.finish_reason
        self.messages.append({"role": "assistant", "content": out.text})
        return out.text

    def _feed(self, ids: list[int], sampling):
        if self.gen is not None:
            have = self.gen.tokens[0]
            keep = min(_common_prefix(have, ids), len(ids) - 1)  # feed at least one token: its logits choose
            if keep > 0:
                self.gen.rewind(len(have) - keep)
                self.fed = len(ids) - self.gen.cached  # a kept chosen token is fed with the new ones
                self.gen.append_tokens([ids[keep:]], params=[sampling])
                return
        self.gen = Generator(self.engine, [ids], params=[sampling],
                             eos_token_id=eos_ids(self.engine, self.tokenizer) or None)
        self.fed = len(ids)
