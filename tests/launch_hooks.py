"""The torchrun launcher with test hooks: `python -m launch_hooks ENGINE_DIR [launcher flags] [hook flags]`
(tests/ on PYTHONPATH), or as the module of `launch.torchrun_command(..., module="launch_hooks")`.

  --dump-logits FILE   rank 0 saves the prefill logits float32 [1, T, V] as .npy (one extra
                       prefill on every rank before generating)
  --report-dir DIR     every rank writes DIR/rank{r}.json: the ranks it holds, their weight bytes,
                       and the model file of every live ONNX Runtime session in the process
  CQIL_TEST_DIE_RANK=r CQIL_TEST_DIE_AFTER_STEPS=n [CQIL_TEST_DIE_HOW=exit|hang]
                       rank r calls os._exit(1) (or sleeps forever) after its n-th generated token
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

from cqil.runtime import launch


class Hooks:
    def __init__(self, dump_logits: str | None, report_dir: str | None, env=os.environ):
        self.dump_logits, self.report_dir = dump_logits, report_dir
        self.die_rank = env.get("CQIL_TEST_DIE_RANK")
        self.die_after = int(env.get("CQIL_TEST_DIE_AFTER_STEPS", "1"))
        self.die_how = env.get("CQIL_TEST_DIE_HOW", "exit")
        self.tokens = 0

    def opened(self, engine, rank: int, args):
        if self.report_dir:
            write_report(Path(self.report_dir), engine, rank)
        if self.dump_logits:
            from cqil.runtime.textio import prompt_of

            _, ids, _ = prompt_of(engine, args)
            logits = engine.logits([ids])  # every rank takes part; rank 0 gets the logits
            if rank == 0:
                np.save(self.dump_logits, logits)

    def token(self, rank: int):
        if self.die_rank != str(rank):
            return
        self.tokens += 1
        if self.tokens >= self.die_after:
            print(f"{launch.PROG}[rank {rank}]: CQIL_TEST_DIE_RANK: {self.die_how} after {self.tokens} token(s)",
                  file=sys.stderr, flush=True)
            if self.die_how == "hang":
                threading.Event().wait()
            os._exit(1)


def write_report(folder: Path, engine, rank: int):
    """What this process holds, read from the live sessions."""
    import onnxruntime as ort

    root = engine.dir.resolve()
    sessions = [o for o in gc.get_objects() if isinstance(o, ort.InferenceSession)]
    report = {"rank": rank, "ranks": engine.ranks, "pid": os.getpid(),
              "weight_bytes": {str(r): engine.weight_bytes(r) for r in engine.ranks},
              "session_files": sorted(Path(s._model_path).resolve().relative_to(root).as_posix() for s in sessions)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps(report))


def main():
    hook_flags = argparse.ArgumentParser(add_help=False)
    hook_flags.add_argument("--dump-logits")
    hook_flags.add_argument("--report-dir")
    ours, rest = hook_flags.parse_known_args(sys.argv[1:])
    sys.argv[1:] = rest
    launch.entry(hooks=Hooks(ours.dump_logits, ours.report_dir))


if __name__ == "__main__":
    main()
