"""`cqil-run` (generate from an engine directory) and `cqil-check` (engine vs PyTorch reference).

    cqil-run ENGINE (--prompt TEXT | --input-ids 1,2,3) [--max-new-tokens N] [sampling] [--json]
    cqil-check ENGINE --model MODEL_DIR [--atol 1e-4] [--steps 32] [--json]

cqil-run streams text to stdout as it is generated (or token ids, when the engine has no
tokenizer); with --json it prints one JSON object at the end instead. cqil-check exits 0 when the
engine matches the reference, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cqil.cli_util import ArgumentParser, run_main
from cqil.errors import CqilError

# -- cqil-run -----------------------------------------------------------------------------------


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


def stdout_streamer(tokenizer):
    """(callback for Engine.generate's streamer, finish()): text as it comes, or token ids without a tokenizer."""
    if tokenizer is None:
        return (lambda token: print(int(token[0]), end=" ", flush=True)), (lambda: None)
    stream = TextStream(tokenizer, lambda text: print(text, end="", flush=True))
    return (lambda token: stream.put(int(token[0]))), stream.end


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise CqilError(f"--input-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CqilError("--input-ids holds no token id")
    return ids


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
    """(tokenizer or None, prompt ids, eos ids or None) from cqil-run's --prompt / --input-ids flags."""
    tokenizer = engine.tokenizer if (args.prompt is not None or engine.has_tokenizer) else None
    if args.prompt is not None:
        ids = tokenizer(args.prompt)["input_ids"]
        if not ids:
            raise CqilError("--prompt encodes to no tokens")
    else:
        ids = parse_ids(args.input_ids)
    return tokenizer, ids, None if args.ignore_eos else (eos_ids(engine, tokenizer) or None)


def run_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cqil-run", description="Generate text with a compiled CQIL engine.")
    parser.add_argument("engine", help="engine directory (cqil-compile -o)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text (needs the tokenizer files in the engine directory)")
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
    parser.add_argument("--launcher", choices=["threads", "torchrun"], default="threads",
                        help="threads: every rank in this process (default); torchrun: one process per rank")
    return parser


def _torchrun(args, argv) -> int:
    """Hand the same flags to `torchrun -m cqil.runtime.launch`, one process per rank of the plan."""
    from cqil.exporters.manifest import read_manifest
    from cqil.runtime.launch import torchrun_command

    p = read_manifest(args.engine, verify=False)["plan"]["p"]
    rest = list(sys.argv[1:] if argv is None else argv)
    rest.remove(args.engine)
    for flag in ("--launcher=torchrun", "--launcher"):
        if flag in rest:
            i = rest.index(flag)
            del rest[i:i + (2 if flag == "--launcher" else 1)]
    return subprocess.call(torchrun_command(args.engine, p, rest))


def run_cli(argv=None) -> int:
    from cqil.runtime.engine import load

    args = run_parser().parse_args(argv)
    if args.launcher == "torchrun":
        return _torchrun(args, argv)
    if args.threads is not None and args.threads < 1:
        raise CqilError(f"--threads must be >= 1, got {args.threads}")
    with load(args.engine, threads=args.threads, verify=not args.no_verify) as engine:
        tokenizer, ids, eos = prompt_of(engine, args)

        put, finish = stdout_streamer(tokenizer) if not args.json else (None, None)
        out = engine.generate([ids], max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              eos_token_id=eos, streamer=put)
        new = out[0][len(ids):]
        stats = engine.stats
        if args.json:
            result = {"input_ids": ids, "output_ids": new, "new_tokens": stats["new_tokens"],
                      "prefill_ms": round(stats["prefill_ms"], 3), "ms_per_token": round(stats["ms_per_token"], 3),
                      "stopped": "eos" if eos and new and new[-1] in eos else "length"}
            if tokenizer is not None:
                result["text"] = tokenizer.decode(new, skip_special_tokens=True)
            print(json.dumps(result))
        else:
            finish()
            print(flush=True)
            print(f"{stats['new_tokens']} tokens, prefill {stats['prefill_ms']:.1f} ms, "
                  f"{stats['ms_per_token']:.2f} ms/token", file=sys.stderr)
    return 0


# -- cqil-check ---------------------------------------------------------------------------------


def check_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cqil-check",
        description="Compare an engine with the PyTorch reference of its plan (same checkpoint, same inputs). "
                    "Exit 0: within tolerance and the same greedy tokens; 1: not; 2: bad input.")
    parser.add_argument("engine", help="engine directory (cqil-compile -o)")
    parser.add_argument("--model", required=True, help="the checkpoint folder the engine was compiled from")
    parser.add_argument("--adapter", help="the LoRA adapter folder merged at compile time, if any")
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    parser.add_argument("--rtol", type=float, default=0.0,
                        help="relative tolerance; an element passes within atol or within rtol (default 0: atol only)")
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps to compare (default 32)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the random inputs (default 2)")
    parser.add_argument("--prompt-len", type=int, default=8, help="random prompt length (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=int, help="engine intra-op threads in all (default: all cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the engine files")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def format_report(report: dict) -> str:
    lines = [f"{'output':<24} {'max abs':>10} {'max rel':>10}  (atol {report['atol']:g}, rtol {report['rtol']:g}, "
             f"{report['dtype']}, batch {report['batch']}, prompt {report['prompt_len']}, {report['steps']} steps)"]
    for name, o in report["outputs"].items():
        lines.append(f"{name:<24} {o['max_abs']:>10.3e} {o['max_rel']:>10.3e}  {'ok' if o['passed'] else 'FAIL'}")
    if report["tokens_agree"]:
        lines.append(f"greedy tokens: identical for {report['steps']} steps")
    else:
        lines.append(f"greedy tokens: differ from step {report['first_token_mismatch']}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def check_cli(argv=None) -> int:
    from cqil.runtime.check import check_engine
    from cqil.runtime.engine import load

    args = check_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise CqilError(f"--threads must be >= 1, got {args.threads}")
    if not Path(args.model).is_dir():
        raise CqilError(f"--model {args.model} is not a directory")
    with load(args.engine, threads=args.threads, verify=not args.no_verify) as engine:
        report = check_engine(engine, args.model, atol=args.atol, rtol=args.rtol, steps=args.steps,
                              batch=args.batch, prompt_len=args.prompt_len, seed=args.seed, adapter=args.adapter)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["passed"] else 1


def run_entry():
    sys.exit(run_main("cqil-run", run_cli))


def check_entry():
    sys.exit(run_main("cqil-check", check_cli))
