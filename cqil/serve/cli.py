"""`cqil-serve ENGINE_DIR [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--max-queue 256]`:
the engine behind OpenAI's HTTP API (see docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from cqil.cli_util import ArgumentParser, add_logging_flags, configure_logging, run_main
from cqil.errors import CqilError
from cqil.runtime.backends import add_backend_flags, backend_options


def serve_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cqil-serve", description="Serve a compiled CQIL engine over OpenAI's HTTP API "
                                                           "(/v1/completions, /v1/chat/completions).")
    parser.add_argument("engine", help="engine directory (cqil-compile -o), with its tokenizer files")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--served-model-name", help="the model name clients send (default: the engine folder's name)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="sequences decoded together at most (default 32); more wait in the queue")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting to join the batch at most (default 256); beyond: 429")
    parser.add_argument("--threads", type=int, help="intra-op threads in all (default: all cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the engine files")
    add_backend_flags(parser)
    add_logging_flags(parser)
    return parser


def serve_cli(argv=None) -> int:
    from cqil.runtime.engine import load
    from cqil.serve.server import Server

    args = serve_parser().parse_args(argv)
    configure_logging(args, "cqil-serve", loggers=("cqil", "uvicorn"))
    if not args.verbose:
        logging.getLogger("uvicorn").setLevel(logging.WARNING)  # its start-up lines say what ours says
    for name in ("max_batch", "max_queue", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CqilError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise CqilError(f"--port must be in [0, 65535], got {args.port}")
    with load(args.engine, threads=args.threads, verify=not args.no_verify, **backend_options(args)) as engine:
        if not engine.has_tokenizer:
            raise CqilError(f"engine: {engine.dir} has no tokenizer files; cqil-serve speaks text (compile from a "
                            f"checkpoint folder that has its tokenizer)")
        Server(engine, args.host, args.port, args.served_model_name, args.max_batch, args.max_queue,
               access_log=args.verbose).run()
    return 0


def serve_entry():
    sys.exit(run_main("cqil-serve", serve_cli))
