"""Ranks as processes: the torchrun entry point.

    torchrun --standalone --nproc-per-node P -m cqil.runtime.launch ENGINE_DIR \\
        (--prompt TEXT | --input-ids 1,2,3) [cqil-run's flags] [--timeout S]

Every process reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from torchrun's environment (here only:
everything below takes the rank as an argument), checks WORLD_SIZE against the engine's plan,
verifies its own files, and opens `Engine(dir, ranks=[rank], collectives=DistCollectives(...))`,
so each process loads only its own rank's segments and keeps its own KV cache. Every rank
tokenises the prompt itself and runs `generate`; rank 0 samples and the collectives carry its
tokens to the others. Rank 0 prints what `cqil-run` prints: streamed text (token ids without a
tokenizer) and a stats line on stderr, or with --json one object. `--threads` is the intra-op
thread count of all processes on this node together, split evenly, as cqil-run splits it
between rank threads. See docs/distributed.md for multi-node launches and failure behaviour.

Exit status: 0 success; 2 bad input or a failed collective (the message names the rank that
stopped); 130 interrupted. A rank that dies or hangs ends every other rank within --timeout.

Test and debug hooks (not for users):
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
import socket
import sys
import threading
from pathlib import Path

from cqil.cli_util import run_main
from cqil.errors import CqilError

PROG = "cqil-launch"


def torchrun_command(engine_dir, nproc: int, args: list[str]) -> list[str]:
    """The command line that runs `engine_dir` as `nproc` processes on this node.

    `python -m torch.distributed.run` is torchrun run by this interpreter; `--standalone` picks a
    free local rendezvous port. `args` are cqil-run's flags (--prompt/--input-ids, sampling, --json ...).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "-m", "cqil.runtime.launch", str(engine_dir), *args]


def parser():
    from cqil.runtime.cli import run_parser

    p = run_parser()  # cqil-run's flags, so that cqil-run can hand its arguments over unchanged
    p.prog = "torchrun --nproc-per-node P -m cqil.runtime.launch"
    p.description = "Generate with a compiled CQIL engine, one process per rank (launched by torchrun)."
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds for the rendezvous and for each collective before a rank is declared "
                        "stopped (default 600)")
    p.add_argument("--dump-logits", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--report-dir", metavar="DIR", help=argparse.SUPPRESS)
    return p


def torchrun_env(env) -> tuple[int, int, int]:
    """(rank, world_size, local_world_size) from torchrun's environment variables."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise CqilError("RANK / WORLD_SIZE are not set: start this module with torchrun, e.g. "
                        "torchrun --standalone --nproc-per-node P -m cqil.runtime.launch ENGINE_DIR ...")
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise CqilError(f"RANK={env['RANK']!r} / WORLD_SIZE={env['WORLD_SIZE']!r} are not integers") from None
    if not 0 <= rank < world:
        raise CqilError(f"RANK {rank} is outside [0, WORLD_SIZE={world})")
    return rank, world, local_world


def verify_rank_files(engine_dir: Path, manifest: dict, rank: int):
    """Check the sha256 of the files this rank opens: its segments and the tokenizer (a node may
    hold only the rank folders of its own ranks)."""
    from cqil.exporters.manifest import verify_files

    rec = next(r for r in manifest["ranks"] if r["rank"] == rank)
    mine = set(manifest.get("tokenizer_files", ())) | {f for s in rec["segments"] for f in s["files"]}
    try:
        verify_files(engine_dir, {"ranks": [rec], "files": {k: v for k, v in manifest["files"].items() if k in mine}})
    except CqilError as e:
        raise CqilError(f"{e} (rank {rank} on host {socket.gethostname()} needs manifest.json, the tokenizer "
                        f"files and rank{rank}/)") from None


def main(argv=None, env=os.environ) -> int:
    from cqil.exporters.manifest import read_manifest
    from cqil.plan import Plan
    from cqil.runtime.dist import DistCollectives

    args = parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise CqilError(f"--threads must be >= 1, got {args.threads}")
    if not args.timeout > 0:
        raise CqilError(f"--timeout must be > 0 seconds, got {args.timeout}")
    rank, world, local_world = torchrun_env(env)
    engine_dir = Path(args.engine)
    manifest = read_manifest(engine_dir, verify=False)
    plan = Plan.from_dict(manifest["plan"])
    if world != plan.p:
        raise CqilError(f"WORLD_SIZE is {world} but {engine_dir} was compiled for p={plan.p} ranks: launch "
                        f"{plan.p} processes in all (torchrun --nproc-per-node {plan.p}, or --nnodes N with "
                        f"N x --nproc-per-node = {plan.p})")
    if not args.no_verify:
        verify_rank_files(engine_dir, manifest, rank)
    collectives = DistCollectives(rank, world, timeout=args.timeout)
    try:
        return generate(args, rank, world, local_world, collectives, env)
    finally:
        collectives.close()


def generate(args, rank: int, world: int, local_world: int, collectives, env) -> int:
    import numpy as np

    from cqil.runtime.cli import TextStream, prompt_of
    from cqil.runtime.engine import Engine

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, (args.threads or cores) // local_world)
    engine = Engine(args.engine, threads=threads, verify=False, ranks=[rank], collectives=collectives)
    if args.report_dir:
        write_report(Path(args.report_dir), engine, rank)
    tokenizer, ids, eos = prompt_of(engine, args)
    if args.dump_logits:
        logits = engine.logits([ids])  # every rank takes part; rank 0 gets the logits
        if rank == 0:
            np.save(args.dump_logits, logits)

    stream = None
    if rank == 0 and not args.json:
        stream = (TextStream(tokenizer, lambda s: print(s, end="", flush=True)) if tokenizer is not None
                  else lambda token: print(int(token), end=" ", flush=True))
    show = stream.put if isinstance(stream, TextStream) else stream
    die = failure_hook(env, rank)

    def put(token):  # int64 [1]: this step's token, on every rank
        if show is not None:
            show(int(token[0]))
        if die is not None:
            die()

    try:
        out = engine.generate([ids], max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              eos_token_id=eos, streamer=put)
    except BaseException:
        if stream is not None:
            print(flush=True)  # end the streamed line before the error message
        raise
    engine.close()
    if rank != 0:
        return 0
    new, stats = out[0][len(ids):], engine.stats
    if args.json:
        result = {"input_ids": ids, "output_ids": new, "new_tokens": stats["new_tokens"],
                  "prefill_ms": round(stats["prefill_ms"], 3), "ms_per_token": round(stats["ms_per_token"], 3),
                  "stopped": "eos" if eos and new and new[-1] in eos else "length",
                  "launcher": "torchrun", "processes": world}
        if tokenizer is not None:
            result["text"] = tokenizer.decode(new, skip_special_tokens=True)
        print(json.dumps(result), flush=True)
    else:
        if isinstance(stream, TextStream):
            stream.end()
        print(flush=True)
        print(f"{stats['new_tokens']} tokens, prefill {stats['prefill_ms']:.1f} ms, "
              f"{stats['ms_per_token']:.2f} ms/token ({world} processes)", file=sys.stderr, flush=True)
    return 0


def write_report(folder: Path, engine, rank: int):
    """What this process holds, read from the live sessions (for the tests)."""
    import onnxruntime as ort

    root = engine.dir.resolve()
    sessions = [o for o in gc.get_objects() if isinstance(o, ort.InferenceSession)]
    report = {"rank": rank, "ranks": engine.ranks, "pid": os.getpid(),
              "weight_bytes": {str(r): engine.weight_bytes(r) for r in engine.ranks},
              "session_files": sorted(Path(s._model_path).resolve().relative_to(root).as_posix() for s in sessions)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps(report))


def failure_hook(env, rank: int):
    """The CQIL_TEST_DIE_* hook: a callable run after every generated token, or None."""
    if env.get("CQIL_TEST_DIE_RANK") != str(rank):
        return None
    after, how, count = int(env.get("CQIL_TEST_DIE_AFTER_STEPS", "1")), env.get("CQIL_TEST_DIE_HOW", "exit"), [0]

    def die():
        count[0] += 1
        if count[0] >= after:
            print(f"{PROG}[rank {rank}]: CQIL_TEST_DIE_RANK: {how} after {count[0]} token(s)", file=sys.stderr, flush=True)
            if how == "hang":
                threading.Event().wait()
            os._exit(1)

    return die


def entry():
    rank = os.environ.get("RANK", "?")
    code = run_main(f"{PROG}[rank {rank}]", main)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # after a failed collective, interpreter teardown could wait on the dead peer
    sys.exit(0)


if __name__ == "__main__":
    entry()
