"""Text in and out of a generation, as cqil-run and the torchrun launcher share it.

- the flags both take (`add_generation_flags`), the prompt they describe (`prompt_of`), the
  sampling they ask for (`sampling_of`) and the end-of-sequence ids an engine knows (`eos_ids`);
- one prompt's generation (`run_prompt`): the Generator stepped by `cqil.runtime.completion.advance`,
  text written as it comes (incremental detokenization, stop strings), token ids without a tokenizer;
- the result at the end (`print_result`: one JSON object with --json, else a stats line logged
  on stderr);
- the interactive chat of `cqil-run --chat` (`chat_loop`), whose conversation keeps its KV cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from cqil.errors import CqilError
from cqil.runtime.completion import Output, advance, eos_ids
from cqil.runtime.detokenize import TextDecoder
from cqil.runtime.generator import Generator
from cqil.runtime.sampling import SamplingParams, legacy_params

log = logging.getLogger("cqil")
PROMPT_MAX_NEW_TOKENS = 32

__all__ = ["add_generation_flags", "sampling_of", "prompt_of", "eos_ids", "run_prompt", "print_result",
           "chat_loop", "TextStream"]


def add_generation_flags(parser: argparse.ArgumentParser, prompt_required: bool = True):
    """The prompt, chat and sampling flags (cqil-run's; the launcher takes the same ones)."""
    what = parser.add_mutually_exclusive_group(required=prompt_required)
    what.add_argument("--prompt", help="prompt text (needs the tokenizer files in the engine directory)")
    what.add_argument("--prompt-file", help="UTF-8 text file holding the prompt")
    what.add_argument("--input-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--chat", action="store_true",
                        help="an interactive conversation under the engine's chat template (one line of stdin per "
                             "turn; the KV cache is kept between turns; --prompt: the first message)")
    parser.add_argument("--system", help="with --chat: the system message")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"tokens to generate (default {PROMPT_MAX_NEW_TOKENS}; with --chat: up to the eos)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="with --do-sample (default 1.0); 0 = greedy, as in OpenAI's API and cqil-run-native")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the most likely's probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating any token seen")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from generated tokens")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per occurrence")
    parser.add_argument("--stop", action="append", help="stop before this text (repeat the flag for several)")
    parser.add_argument("--seed", type=int, help="random seed for --do-sample")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--threads", type=int, help="intra-op threads in all (default: all cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the engine files")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def sampling_of(args, chat: bool = False) -> SamplingParams:
    """The sampling the flags ask for (greedy without --do-sample)."""
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = None if chat else PROMPT_MAX_NEW_TOKENS
    elif max_new < 1:
        raise CqilError(f"max_new_tokens must be >= 1, got {max_new}")
    greedy = args.temperature == 0  # OpenAI's convention, which cqil-serve and cqil-run-native follow too
    params = legacy_params(args.do_sample and not greedy, 1.0 if greedy else args.temperature, args.top_k,
                           args.top_p, args.seed)
    return params.replace(min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          stop=tuple(args.stop or ()), max_tokens=max_new, ignore_eos=args.ignore_eos)


class TextStream:
    """Writes a token stream's text through `write` as it comes, never splitting a character."""

    def __init__(self, tokenizer, write, stop=()):
        self.decoder, self.write = TextDecoder(tokenizer, stop), write

    def put(self, token: int):
        text = self.decoder.push(int(token))
        if text:
            self.write(text)

    def end(self):
        text = self.decoder.finish()
        if text:
            self.write(text)


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


def prompt_of(engine, args):
    """(tokenizer or None, prompt ids, eos ids or None) from the --prompt / --prompt-file / --input-ids flags."""
    text = prompt_text(args)
    if text is None and args.input_ids is None:
        raise CqilError("one of the arguments --prompt --prompt-file --input-ids is required (or --chat)")
    tokenizer = engine.tokenizer if (text is not None or engine.has_tokenizer) else None
    if text is not None:
        ids = tokenizer(text)["input_ids"]
        if not ids:
            raise CqilError("the prompt encodes to no tokens")
    else:
        ids = parse_ids(args.input_ids)
    return tokenizer, ids, None if args.ignore_eos else (eos_ids(engine, tokenizer) or None)


def run_prompt(engine, args, tokenizer, ids: list[int], eos, write=None, on_token=None) -> tuple[Output, dict]:
    """Generate from one prompt as the flags say. `write(str)` gets the text as it comes (token ids
    without a tokenizer); `on_token(int)` every token. Returns the Output and its timing stats."""
    params = sampling_of(args)
    if params.stop and tokenizer is None:
        raise CqilError("--stop needs the engine's tokenizer (stop strings are text)")
    out = Output(params, tokenizer, ids)
    t0 = time.perf_counter()
    gen = Generator(engine, [ids], params=[params], eos_token_id=eos)
    t1 = time.perf_counter()
    while not gen.done:
        delta = advance(gen, [out])[0]
        token = out.token_ids[-1]
        if on_token is not None:
            on_token(token)
        if write is not None:
            write(delta if tokenizer is not None else f"{token} ")
    t_decode = time.perf_counter() - t1
    steps = gen.new_tokens
    stats = {"prefill_ms": 1000 * (t1 - t0), "new_tokens": steps,
             "ms_per_token": 1000 * t_decode / max(steps - 1, 1) if steps > 1 else 0.0}
    return out, stats


def write_stdout(text: str):
    print(text, end="", flush=True)


def print_result(args, out: Output, stats: dict, tokenizer, ids: list[int], **extra):
    """After a generation: one JSON object (--json) or the stats line (logged, on stderr)."""
    if args.json:
        stopped = "eos" if out.finish_reason == "stop" else "length"  # an eos or a stop token id
        if out.decoder is not None and out.decoder.stopped:
            stopped = "stop"  # a stop string
        result = {"input_ids": ids, "output_ids": out.token_ids, "new_tokens": stats["new_tokens"],
                  "prefill_ms": round(stats["prefill_ms"], 3), "ms_per_token": round(stats["ms_per_token"], 3),
                  "stopped": stopped, **extra}
        if tokenizer is not None:
            result["text"] = out.text
        print(json.dumps(result), flush=True)
    else:
        print(flush=True)  # ends the streamed text
        where = f" ({extra['processes']} processes)" if "processes" in extra else ""
        log.info(f"{stats['new_tokens']} tokens, prefill {stats['prefill_ms']:.1f} ms, "
                 f"{stats['ms_per_token']:.2f} ms/token{where}")


def chat_loop(engine, args, stdin=None) -> int:
    """`cqil-run --chat`: one user message per line of stdin (empty lines skipped, /exit or end of
    input ends); each reply streamed to stdout, one line per turn end."""
    if args.json:
        raise CqilError("--json does not go with --chat (the chat prints text as it comes)")
    if args.input_ids is not None or args.prompt_file is not None:
        raise CqilError("--chat takes text: give the first message with --prompt, or type it")
    stdin = stdin or sys.stdin
    fields = {k: v for k, v in dataclasses.asdict(sampling_of(args, chat=True)).items() if v is not None}
    chat = engine.start_chat(system=args.system, **fields)
    first = prompt_text(args)
    interactive = stdin.isatty()
    while True:
        if first is not None:
            line, first = first, None
        else:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
        t0 = time.perf_counter()
        chat.send(line, on_text=write_stdout)
        print(flush=True)
        log.debug(f"turn: fed {chat.fed} tokens, {time.perf_counter() - t0:.2f} s, {chat.finish_reason}")
    return 0
