"""`cqil-run`: generate from an engine directory.

    cqil-run ENGINE (--prompt TEXT | --input-ids 1,2,3) [--max-new-tokens N] [sampling] [--json]
                    [--launcher threads|torchrun]

Streams text to stdout as it is generated (or token ids, when the engine has no tokenizer); with
--json it prints one JSON object at the end instead. With `--launcher torchrun` the same flags go to
one process per rank (`cqil.runtime.launch`).
"""

from __future__ import annotations

import argparse
import sys

from cqil.cli_util import ArgumentParser, run_main
from cqil.errors import CqilError
from cqil.runtime.backends import add_backend_flags, backend_options
from cqil.runtime.textio import StdoutStream, add_generation_flags, print_result, prompt_of, sampling_of


def run_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cqil-run", description="Generate text with a compiled CQIL engine.")
    parser.add_argument("engine", help="engine directory (cqil-compile -o)")
    add_generation_flags(parser)
    add_backend_flags(parser)
    parser.add_argument("--launcher", choices=["threads", "torchrun"], default="threads",
                        help="threads: every rank in this process (default); torchrun: one process per rank")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a collective waits for a rank before naming it as stopped (default 600)")
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
    if args.threads is not None and args.threads < 1:
        raise CqilError(f"--threads must be >= 1, got {args.threads}")
    if not args.timeout > 0:
        raise CqilError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.launcher == "torchrun":
        return _torchrun(args, argv)
    with load(args.engine, threads=args.threads, verify=not args.no_verify, collective_timeout=args.timeout,
              **backend_options(args)) as engine:
        tokenizer, ids, eos = prompt_of(engine, args)
        stream = StdoutStream(tokenizer) if not args.json else None
        out = engine.generate([ids], eos_token_id=eos, streamer=stream, **sampling_of(args))
        print_result(args, engine, tokenizer, ids, out[0], eos)
    return 0


def run_entry():
    sys.exit(run_main("cqil-run", run_cli))
