"""`cqil-run`: generate from an engine directory.

    cqil-run ENGINE (--prompt TEXT | --input-ids 1,2,3) [--max-new-tokens N] [sampling] [--stop S] [--json]
                    [--launcher threads|torchrun]
    cqil-run ENGINE --chat [--system TEXT] [sampling]       # one user message per line of stdin

Streams text to stdout as it is generated (or token ids, when the engine has no tokenizer); with
--json it prints one JSON object at the end instead. With `--launcher torchrun` the same flags go to
one process per rank (`cqil.runtime.launch`). `--chat` keeps the conversation's KV cache between
turns, so a turn feeds only its new tokens.
"""

from __future__ import annotations

import argparse
import sys

from cqil.cli_util import ArgumentParser, add_logging_flags, configure_logging, run_main
from cqil.errors import CqilError
from cqil.runtime.backends import add_backend_flags, backend_options
from cqil.runtime.textio import add_generation_flags, chat_loop, print_result, prompt_of, run_prompt, write_stdout


def run_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cqil-run", description="Generate text with a compiled CQIL engine.")
    parser.add_argument("engine", help="engine directory (cqil-compile -o)")
    add_generation_flags(parser, prompt_required=False)  # --chat needs none
    add_backend_flags(parser)
    parser.add_argument("--launcher", choices=["threads", "torchrun"], default="threads",
                        help="threads: every rank in this process (default); torchrun: one process per rank")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a collective waits for a rank before naming it as stopped (default 600)")
    add_logging_flags(parser)
    return parser


def _torchrun(args, argv) -> int:
    """Hand the same flags to `torchrun -m cqil.runtime.launch`, one process per rank of the plan."""
    from cqil.exporters.manifest import read_manifest
    from cqil.runtime.launch import run_torchrun

    p = read_manifest(args.engine, verify=False)["plan"]["p"]
    rest = list(sys.argv[1:] if argv is None else argv)
    rest.remove(args.engine)
    for flag in ("--launcher=torchrun", "--launcher"):
        if flag in rest:
            i = rest.index(flag)
            del rest[i:i + (2 if flag == "--launcher" else 1)]
    return run_torchrun(args.engine, p, rest)


def run_cli(argv=None) -> int:
    from cqil.runtime.engine import load

    args = run_parser().parse_args(argv)
    configure_logging(args, "cqil-run")
    if args.threads is not None and args.threads < 1:
        raise CqilError(f"--threads must be >= 1, got {args.threads}")
    if not args.timeout > 0:
        raise CqilError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.system is not None and not args.chat:
        raise CqilError("--system goes with --chat")
    if args.launcher == "torchrun":
        if args.chat:
            raise CqilError("--chat runs with the threads launcher (the default)")
        return _torchrun(args, argv)
    with load(args.engine, threads=args.threads, verify=not args.no_verify, collective_timeout=args.timeout,
              **backend_options(args)) as engine:
        if args.chat:
            return chat_loop(engine, args)
        tokenizer, ids, eos = prompt_of(engine, args)
        out, stats = run_prompt(engine, args, tokenizer, ids, eos, write=None if args.json else write_stdout)
        print_result(args, out, stats, tokenizer, ids)
    return 0


def run_entry():
    sys.exit(run_main("cqil-run", run_cli))
