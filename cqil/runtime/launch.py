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

`main(argv, env, hooks)` takes an object with `opened(engine, rank, args)` and `token(rank)`
methods, called once the engine is open and after every generated token; the tests use them
(tests/launch_hooks.py) to record what a process holds and to make a rank die.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from cqil.cli_util import ArgumentParser, run_main
from cqil.errors import CqilError
from cqil.exporters.manifest import read_manifest, verify_files
from cqil.runtime.textio import StdoutStream, add_generation_flags, print_result, prompt_of, sampling_of

PROG = "cqil-launch"


def torchrun_command(engine_dir, nproc: int, args: list[str], module: str = "cqil.runtime.launch") -> list[str]:
    """The command line that runs `engine_dir` as `nproc` processes on this node.

    `python -m torch.distributed.run` is torchrun run by this interpreter; `--standalone` picks a
    free local rendezvous port. `args` are cqil-run's flags (--prompt/--input-ids, sampling, --json ...).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "-m", module, str(engine_dir), *args]


def parser():
    p = ArgumentParser(prog="torchrun --nproc-per-node P -m cqil.runtime.launch",
                       description="Generate with a compiled CQIL engine, one process per rank (launched by torchrun).")
    p.add_argument("engine", help="engine directory (cqil-compile -o)")
    add_generation_flags(p)  # cqil-run's flags, so that cqil-run can hand its arguments over unchanged
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds for the rendezvous and for each collective before a rank is declared "
                        "stopped (default 600)")
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
    rec = next(r for r in manifest["ranks"] if r["rank"] == rank)
    mine = set(manifest.get("tokenizer_files", ())) | {f for s in rec["segments"] for f in s["files"]}
    try:
        verify_files(engine_dir, {"ranks": [rec], "files": {k: v for k, v in manifest["files"].items() if k in mine}})
    except CqilError as e:
        raise CqilError(f"{e} (rank {rank} on host {socket.gethostname()} needs manifest.json, the tokenizer "
                        f"files and rank{rank}/)") from None


def main(argv=None, env=os.environ, hooks=None) -> int:
    from cqil.runtime.dist import DistCollectives

    args = parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise CqilError(f"--threads must be >= 1, got {args.threads}")
    if not args.timeout > 0:
        raise CqilError(f"--timeout must be > 0 seconds, got {args.timeout}")
    rank, world, local_world = torchrun_env(env)
    engine_dir = Path(args.engine)
    manifest = read_manifest(engine_dir, verify=False)
    p = manifest["plan"]["p"]
    if world != p:
        raise CqilError(f"WORLD_SIZE is {world} but {engine_dir} was compiled for p={p} ranks: launch "
                        f"{p} processes in all (torchrun --nproc-per-node {p}, or --nnodes N with "
                        f"N x --nproc-per-node = {p})")
    if not args.no_verify:
        verify_rank_files(engine_dir, manifest, rank)
    collectives = DistCollectives(rank, world, timeout=args.timeout)
    try:
        return generate(args, rank, world, local_world, collectives, hooks)
    finally:
        collectives.close()


def generate(args, rank: int, world: int, local_world: int, collectives, hooks=None) -> int:
    from cqil.runtime.engine import Engine

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, (args.threads or cores) // local_world)
    engine = Engine(args.engine, threads=threads, verify=False, ranks=[rank], collectives=collectives)
    if hooks is not None:
        hooks.opened(engine, rank, args)
    tokenizer, ids, eos = prompt_of(engine, args)
    stream = StdoutStream(tokenizer) if rank == 0 and not args.json else None

    def put(token):  # int64 [1]: this step's token, on every rank
        if stream is not None:
            stream.put(token)
        if hooks is not None:
            hooks.token(rank)

    try:
        out = engine.generate([ids], eos_token_id=eos, streamer=put, **sampling_of(args))
    except BaseException:
        if stream is not None:
            print(flush=True)  # end the streamed line before the error message
        raise
    engine.close()
    if rank == 0:
        if stream is not None:
            stream.end()
        print_result(args, engine, tokenizer, ids, out[0], eos, launcher="torchrun", processes=world)
    return 0


def entry(hooks=None):
    rank = os.environ.get("RANK", "?")
    code = run_main(f"{PROG}[rank {rank}]", lambda argv: main(argv, hooks=hooks))
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # after a failed collective, interpreter teardown could wait on the dead peer
    sys.exit(0)


if __name__ == "__main__":
    entry()
