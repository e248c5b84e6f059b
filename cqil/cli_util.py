"""What every cqil command line shares: one-line errors, exit codes, logging (--quiet/--verbose),
the plan flags.

Exit codes: 0 success, 1 a check that ran and failed (cqil-check) or a rank process that died,
2 bad input (`CqilError`, argparse), 128 + N stopped by signal N: 130 SIGINT (Ctrl-C), 129 SIGHUP,
143 SIGTERM. SIGHUP and SIGTERM are handled like Ctrl-C: they raise in the main thread, so every
`finally` and `except BaseException` cleanup runs (temporary folders removed, child processes
stopped). Set CQIL_DEBUG=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback

from cqil.errors import CqilError, first_line
from cqil.plan import SEMANTICS, Plan, resolve_plan


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage stays in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Stopped(BaseException):
    """A SIGTERM or SIGHUP, raised where the main thread is, like KeyboardInterrupt for SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise():
    """Within: SIGTERM and SIGHUP raise `Stopped` in the main thread (outside it: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_main(prog: str, main, argv=None) -> int:
    try:
        with stop_signals_raise():
            return main(argv) or 0
    except CqilError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Stopped as e:
        print(f"{prog}: stopped by {e}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # an unexpected failure is still reported on one line
        if os.environ.get("CQIL_DEBUG"):
            traceback.print_exc()
        notes = "".join(f" {n}" for n in getattr(e, "__notes__", ()))
        print(f"{prog}: internal error: {type(e).__name__}: {first_line(e)}{notes} (set CQIL_DEBUG=1 for the "
              f"traceback)", file=sys.stderr)
        return 1


# -- logging: every command's diagnostics go through logging.getLogger("cqil") ------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirected stream)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Format(logging.Formatter):
    """Information as plain lines (progress, stats); warnings and errors named by the command."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record):
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{self.prog}: {record.levelname.lower()}: {message}"
        return message


def add_logging_flags(parser: argparse.ArgumentParser):
    """--quiet / --verbose, as every cqil command takes them (then call `configure_logging(args)`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", help="print only results, warnings and errors")
    group.add_argument("--verbose", action="store_true", help="also print debug messages")


def configure_logging(args=None, prog: str | None = None, *, quiet: bool = False, verbose: bool = False,
                      loggers=("cqil",)) -> int:
    """Send the "cqil" logger's records (and those of `loggers`) to stderr: information by default,
    warnings and errors only with --quiet, debug messages too with --verbose. `args` is the parsed
    command line of a parser that has `add_logging_flags`. Calling it again (another command in the
    same process) replaces the handler. Returns the level. Applications that embed cqil configure
    the "cqil" logger themselves instead; without either, only warnings reach stderr (Python's
    last-resort handler)."""
    quiet = quiet or bool(getattr(args, "quiet", False))
    verbose = verbose or bool(getattr(args, "verbose", False))
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(_Format(prog or os.path.basename(sys.argv[0]) or "cqil"))
    for name in loggers:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return level


def add_hub_flags(parser: argparse.ArgumentParser):
    """--revision / --cache-dir, for commands whose MODEL may be a hub id (cqil.model.hub.resolve_model)."""
    parser.add_argument("--revision", help="with a hub id as MODEL: the branch, tag or commit (default main)")
    parser.add_argument("--cache-dir", help="with a hub id as MODEL: the download cache (default: HF_HUB_CACHE, "
                                            "~/.cache/huggingface/hub)")


def add_plan_flags(parser: argparse.ArgumentParser, p_required: bool = False, p_auto_help: str | None = None):
    """The plan flags shared by cqil-compile, cqil-finetune, cqil-eval. With `p_auto_help`, --p also
    takes 'auto' (cqil-compile's latency model picks it), described by that text."""
    if p_auto_help is None:
        parser.add_argument("--p", type=int, required=p_required, help="layers per group = number of ranks")
    else:
        parser.add_argument("--p", type=_int_or_auto, required=p_required,
                            help=f"layers per group = number of ranks; {p_auto_help}")
    parser.add_argument("--start", type=int, help="first layer of the CQIL range (default: see README)")
    parser.add_argument("--end", type=int, help="end of the CQIL range, exclusive (default: num_layers - 2)")
    parser.add_argument("--bypass", type=int, default=None, help="bypass distance d, 0 <= d < p (default 0)")
    parser.add_argument("--bypass-semantics", choices=SEMANTICS, default=None,
                        help="'once' (default) or 'reference' (the authors' released code; the default "
                             "for a plan read from the checkpoint's cqil_layers)")
    parser.add_argument("--replicate-outer", action="store_true",
                        help="run the layers outside the range on every rank instead of rank 0 only")


def _int_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give an integer or 'auto'") from None


def plan_from_args(cfg, args) -> tuple[Plan, str]:
    """The plan of the plan flags for a model of config `cfg` (a ModelConfig), and its source."""
    return resolve_plan(cfg.num_layers, p=args.p, start=args.start, end=args.end, bypass=args.bypass,
                        semantics=args.bypass_semantics, replicate_outer=args.replicate_outer, authors=cfg.extra)
