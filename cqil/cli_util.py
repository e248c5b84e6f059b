"""What every cqil command line shares: one-line errors and exit codes.

Exit codes: 0 success, 1 a check that ran and failed (cqil-check), 2 bad input (`CqilError`,
argparse), 130 interrupted. Set CQIL_DEBUG=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from cqil.errors import CqilError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage stays in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(prog: str, main, argv=None) -> int:
    try:
        return main(argv) or 0
    except CqilError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # an unexpected failure is still reported on one line
        if os.environ.get("CQIL_DEBUG"):
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(set CQIL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
