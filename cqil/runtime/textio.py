"""Text in and out of a generation, as cqil-run and the torchrun launcher share it.

- the flags both take (`add_generation_flags`), the prompt they describe (`prompt_of`) and the
  end-of-sequence ids an engine knows (`eos_ids`);
- streaming text to stdout as tokens come (`TextStream`), and the result printed at the end
  (`print_result`: one JSON object with --json, else a stats line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

from cqil.errors import CqilError


def add_generation_flags(parser: argparse.ArgumentParser):
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text (needs the tokenizer files in the engine directory)")
    what.add_argument("--prompt-file", help="UTF-8 text file holding the prompt")
    what.add_argument("--input-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="random seed for --do-sample")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--threads", type=int, help="intra-op threads in all (default: all cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the engine files")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def sampling_of(args) -> dict:
    """Engine.generate's sampling keywords from the flags."""
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed)


class TextStream:
    """Print generated text as it comes, one token at a time, without splitting a character.

    A character may span several tokens (byte-level BPE): the whole new-token list is decoded each
    step and only the new suffix is written, holding back a trailing U+FFFD (an unfinished UTF-8
    sequence) until the next token completes it.
    """

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.printed = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _emit(self, text: str):
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.write(text[len(self.printed):])
            self.printed = text

    def put(self, token: int):
        self.ids.append(int(token))
        self._emit(self._text().rstrip("\ufffd"))

    def end(self):
        self._emit(self._text())


class StdoutStream:
    """Row 0's tokens to stdout as they come: text with a tokenizer, else token ids."""

    def __init__(self, tokenizer):
        write = lambda s: print(s, end="", flush=True)
        self.text = TextStream(tokenizer, write) if tokenizer is not None else None
        self.write = write
        self.started = False

    def put(self, token):  # int64 [B]
        self.started = True
        if self.text is not None:
            self.text.put(int(token[0]))
        else:
            self.write(f"{int(token[0])} ")

    def end(self):
        if self.text is not None:
            self.text.end()
        print(flush=True)


def parse_ids(text: str) -> list[int]:
    items = text.replace(" ", "").split(",")
    if not all(x.lstrip("-").isdigit() for x in items):
        raise CqilError(f"--input-ids must be comma-separated integers (no empty items), got {text!r}")
    return [int(x) for x in items]


def prompt_text(args) -> str | None:
    """--prompt or the contents of --prompt-file, as valid UTF-8 text (None with --input-ids)."""
    if args.prompt_file is not None:
        try:
            raw = open(args.prompt_file, "rb").read()
        except OSError as e:
            raise CqilError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CqilError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")  # undecodable command-line bytes arrive as lone surrogates
        except UnicodeEncodeError as e:
            raise CqilError(f"--prompt is not valid UTF-8 (character {e.start})") from None
    return args.prompt


def eos_ids(engine, tokenizer) -> list[int]:
    """Every end-of-sequence id the engine knows: tokenizer, generation_config.json, model config."""
    found = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    gen = engine.dir / "generation_config.json"
    if gen.is_file():
        try:
            found.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise CqilError(f"engine: {gen} is not a valid JSON object") from None
    found.append(engine.config.eos_token_id)
    flat = []
    for e in found:
        flat += e if isinstance(e, list) else [e]
    return sorted({int(e) for e in flat if e is not None})


def prompt_of(engine, args):
    """(tokenizer or None, prompt ids, eos ids or None) from the --prompt / --prompt-file / --input-ids flags."""
    text = prompt_text(args)
    tokenizer = engine.tokenizer if (text is not None or engine.has_tokenizer) else None
    if text is not None:
        ids = tokenizer(text)["input_ids"]
        if not ids:
            raise CqilError("the prompt encodes to no tokens")
    else:
        ids = parse_ids(args.input_ids)
    return tokenizer, ids, None if args.ignore_eos else (eos_ids(engine, tokenizer) or None)


def print_result(args, engine, tokenizer, ids: list[int], out: list[int], eos, **extra):
    """After a generation: one JSON object (--json) or the stats line on stderr."""
    new, stats = out[len(ids):], engine.stats
    if args.json:
        result = {"input_ids": ids, "output_ids": new, "new_tokens": stats["new_tokens"],
                  "prefill_ms": round(stats["prefill_ms"], 3), "ms_per_token": round(stats["ms_per_token"], 3),
                  "stopped": "eos" if eos and new and new[-1] in eos else "length", **extra}
        if tokenizer is not None:
            result["text"] = tokenizer.decode(new, skip_special_tokens=True)
        print(json.dumps(result), flush=True)
    else:
        where = f" ({extra['processes']} processes)" if "processes" in extra else ""
        print(f"{stats['new_tokens']} tokens, prefill {stats['prefill_ms']:.1f} ms, "
              f"{stats['ms_per_token']:.2f} ms/token{where}", file=sys.stderr, flush=True)
