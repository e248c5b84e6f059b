"""Tokens to text as they come: incremental detokenization and stop strings, for one row.

    text = TextDecoder(tokenizer, stop=("\\n\\n",), context=prompt_ids)
    for token in tokens:
        print(text.push(token), end="")     # only what is certain: whole characters, no stop string
        if text.stopped: break
    print(text.finish())                    # what was held back, when no stop string came

Decoding uses the tokenizers library's `DecodeStream` (each step decodes only the newest tokens,
given a few before them as context), so a character spread over several byte tokens is written
once it is whole, and a long output costs the same per token as a short one. A tokenizer without
a `tokenizers` backend (a slow one) falls back to decoding the whole output each step and writing
the new suffix.

Stop strings (OpenAI `stop`): the output ends before the first one that appears, which is not
part of the text. Text that could still become a stop string (a suffix that is a prefix of one)
is held back until the next tokens decide.
"""

from __future__ import annotations

CONTEXT = 8  # prompt tokens the stream decoder starts from (a leading space depends on its neighbour)


class TextDecoder:
    def __init__(self, tokenizer, stop=(), context=(), skip_special_tokens: bool = True):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # released so far
        self.stopped: str | None = None  # the stop string that ended the output
        self._held = ""  # decoded, not released: it may begin a stop string
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=list(context)[-CONTEXT:], skip_special_tokens=skip_special_tokens)
        self._decoded = ""  # the fallback's decoding of self.ids, without an unfinished character

    def push(self, token: int) -> str:
        """Add one token; the text that is now certain (may be "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        if self._backend is not None:
            self._held += self._stream.step(self._backend, int(token)) or ""
        else:
            whole = self._decode().rstrip("\ufffd")  # a trailing U+FFFD: an unfinished UTF-8 sequence
            if whole.startswith(self._decoded):
                self._held += whole[len(self._decoded):]
                self._decoded = whole
        return self._release(final=False)

    def finish(self) -> str:
        """The output is over: release what was held back (and a last unfinished character, as U+FFFD)."""
        if self.stopped:
            return ""
        whole = self._decode()
        done = self.text + self._held
        if whole.startswith(done) and self._backend is not None:
            self._held += whole[len(done):]
        elif self._backend is None and whole.startswith(self._decoded):
            self._held += whole[len(self._decoded):]
        return self._release(final=True)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def _release(self, final: bool) -> str:
        held, out = self._held, self._held
        if self.stop:
            hits = [(held.find(s), s) for s in self.stop if s in held]
            if hits:
                at, s = min(hits)
                self.stopped, self._held = s, ""
                self.text += held[:at]
                return held[:at]
            if not final:
                keep = max((k for s in self.stop for k in range(1, min(len(s), len(held) + 1))
                            if held.endswith(s[:k])), default=0)
                out = held[:len(held) - keep]
        self._held = held[len(out):]
        self.text += out
        return out


def token_text(tokenizer, token: int) -> str:
    """One token's own text, as logprobs report it (a lone byte of a longer character is U+FFFD)."""
    return tokenizer.decode([int(token)], skip_special_tokens=False)
