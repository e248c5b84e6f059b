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

`cqil-run --launcher torchrun` starts torchrun through `run_torchrun`, which owns every process it
starts: torchrun runs in a session of its own with its stderr (its tracebacks and the ranks'
messages) in a log file; Ctrl-C, SIGTERM or SIGHUP stop torchrun and every rank process (SIGTERM,
then SIGKILL after a grace period), as does a rank that exits while torchrun lingers; the user sees
one line naming the rank that failed and its cause, and the log's path. Exit status: as the ranks'
(2 bad input, 1 a rank died or hung), 130 / 143 / 129 when interrupted or stopped.

`main(argv, env, hooks)` takes an object with `opened(engine, rank, args)` and `token(rank)`
methods, called once the engine is open and after every generated token; the tests use them
(tests/launch_hooks.py) to record what a process holds and to make a rank die.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cqil.cli_util import ArgumentParser, add_logging_flags, configure_logging, run_main
from cqil.errors import CqilError
from cqil.exporters.manifest import read_manifest, verify_files
from cqil.runtime.backends import add_backend_flags
from cqil.runtime.textio import add_generation_flags, print_result, prompt_of, run_prompt, write_stdout

PROG = "cqil-launch"


def torchrun_command(engine_dir, nproc: int, args: list[str], module: str = "cqil.runtime.launch") -> list[str]:
    """The command line that runs `engine_dir` as `nproc` processes on this node.

    `python -m torch.distributed.run` is torchrun run by this interpreter; `--standalone` picks a
    free local rendezvous port. `args` are cqil-run's flags (--prompt/--input-ids, sampling, --json ...).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "-m", module, str(engine_dir), *args]


GRACE = 5.0  # seconds a process gets to stop after SIGTERM, and torchrun after its first rank ended


def run_torchrun(engine_dir, nproc: int, args: list[str]) -> int:
    """Run the engine as `nproc` rank processes under torchrun, owning all of them (see the module doc)."""
    import psutil

    fd, log = tempfile.mkstemp(prefix="cqil-run-torchrun-", suffix=".log")
    with os.fdopen(fd, "w") as err:
        proc = subprocess.Popen(torchrun_command(engine_dir, nproc, args), stderr=err, start_new_session=True,
                                preexec_fn=_die_with_parent)
    agent = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}  # every rank process torchrun started
    first_end = None
    try:
        while proc.poll() is None:
            for child in _children(agent):
                seen.setdefault(child.pid, child)
            if first_end is None and any(not p.is_running() for p in seen.values()):
                first_end = time.monotonic()
            if first_end is not None and time.monotonic() - first_end > GRACE:
                break  # a rank ended and torchrun is still waiting on the others: stop them ourselves
            time.sleep(0.1)
    except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: nothing may outlive us
        _stop([agent, *seen.values()])
        raise
    _stop([agent, *seen.values()])
    text = Path(log).read_text(errors="replace")
    if proc.returncode == 0:
        for line in re.findall(r"^\d+ tokens, prefill .*$", text, re.M):  # rank 0's stats line
            print(line, file=sys.stderr)
        os.unlink(log)
        return 0
    cause, code = root_cause(text)
    raise RankProcessFailed(f"{cause} (torchrun's log: {log})", code)


class RankProcessFailed(CqilError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def root_cause(log: str) -> tuple[str, int]:
    """(one line naming the failing rank and why, exit status) from torchrun's stderr.

    The ranks' own error lines come first: one that is not a victim's (a peer failure) is the
    cause (status 2 for bad input, as the rank said); else a victim's line, which names the rank
    that stopped (status 1); else torchrun's own summary of the first failure.
    """
    lines = [m.groups() for m in re.finditer(r"^cqil-launch\[rank (\d+)\]: (error|internal error): (.*)$", log, re.M)]
    victims = [(r, msg) for r, kind, msg in lines if kind == "error" and _VICTIM.search(msg)]
    own = sorted((int(r), kind, msg) for r, kind, msg in lines if (r, msg) not in victims)
    if own:
        r, kind, msg = own[0]
        return (msg if msg.startswith(f"rank {r}") else f"rank {r}: {msg}"), (2 if kind == "error" else 1)
    if victims:
        return victims[0][1], 1
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", log, re.S)
    if m:
        rank, code = int(m[1]), int(m[2])
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return f"rank {rank} {how}", 1
    return "torchrun failed before any rank reported", 1


_VICTIM = re.compile(r"\(collective #\d+\) failed:|refused: an earlier collective failed")


def _children(agent):
    import psutil

    try:
        return agent.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop(procs):
    """SIGTERM every process still running, SIGKILL those left after GRACE seconds."""
    import psutil

    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
            p.resume()  # a stopped (SIGSTOP) process handles SIGTERM only once it runs
    _, alive = psutil.wait_procs(alive, timeout=GRACE)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=GRACE)


def _die_with_parent():
    """In torchrun's process: get SIGTERM when cqil-run dies, even by SIGKILL (Linux; elsewhere nothing)."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def parser():
    p = ArgumentParser(prog="torchrun --nproc-per-node P -m cqil.runtime.launch",
                       description="Generate with a compiled CQIL engine, one process per rank (launched by torchrun).")
    p.add_argument("engine", help="engine directory (cqil-compile -o)")
    add_generation_flags(p)  # cqil-run's flags, so that cqil-run can hand its arguments over unchanged
    add_backend_flags(p)
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds for the rendezvous and for each collective before a rank is declared "
                        "stopped (default 600)")
    add_logging_flags(p)
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
    configure_logging(args, f"{PROG}[rank {env.get('RANK', '?')}]")
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
    device = rank_device(args.devices, int(env.get("LOCAL_RANK", rank)), local_world)
    prog = f"{PROG}[rank {rank}]"
    collectives = DistCollectives(rank, world, timeout=args.timeout, device=device,
                                  on_hang=lambda message: _exit_with(f"{prog}: error: {message}"))
    try:
        return generate(args, rank, world, local_world, collectives, hooks, device)
    finally:
        collectives.close()


def rank_device(devices: str | None, local_rank: int, local_world: int) -> str:
    """This process's device from --devices: "cpu", or its own GPU ("cuda" = GPU LOCAL_RANK; a
    list gives one device per local rank). Collectives then use NCCL, which needs one GPU per rank."""
    if devices is None or devices == "cpu":
        return "cpu"
    listed = [d.strip() for d in devices.split(",")]
    if len(listed) > 1 and len(listed) != local_world:
        raise CqilError(f"--devices lists {len(listed)} devices, this node runs {local_world} ranks: give one per "
                        f"local rank, or --devices cuda")
    if len(listed) == 1 and listed[0] == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise CqilError("--devices cuda: torch sees no CUDA device; use --devices cpu")
        listed = [f"cuda:{i}" for i in range(local_world)]
        if count < local_world:
            listed = [f"cuda:{i % count}" for i in range(local_world)]
    if any(d == "cpu" for d in listed):
        raise CqilError(f"--devices {devices}: put every rank on a GPU, or all on the CPU")
    shared = sorted({d for d in listed if listed.count(d) > 1})
    if shared:
        raise CqilError(f"--devices: local ranks would share {', '.join(shared)}, and NCCL cannot put two ranks on "
                        f"one GPU; run them as threads of one process instead (cqil-run without --launcher "
                        f"torchrun: ranks on one GPU get a stream each)")
    return listed[local_rank]


def _exit_with(line: str):
    print(line, file=sys.stderr, flush=True)
    os._exit(1)


def generate(args, rank: int, world: int, local_world: int, collectives, hooks=None, device: str = "cpu") -> int:
    from cqil.runtime.engine import Engine

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, (args.threads or cores) // local_world)
    options = {"devices": device} if device != "cpu" or args.devices else {}
    engine = Engine(args.engine, threads=threads, verify=False, ranks=[rank], collectives=collectives,
                    backend=args.backend, **options)
    if hooks is not None:
        hooks.opened(engine, rank, args)
    tokenizer, ids, eos = prompt_of(engine, args)
    streaming = rank == 0 and not args.json
    started = []

    def write(text: str):
        started.append(True)
        write_stdout(text)

    def put(token):  # this step's token, on every rank
        if hooks is not None:
            hooks.token(rank)

    try:
        out, stats = run_prompt(engine, args, tokenizer, ids, eos, write=write if streaming else None, on_token=put)
    except BaseException:
        if started:
            print(flush=True)  # end the streamed line before the error message
        raise
    engine.close()
    if rank == 0:
        print_result(args, out, stats, tokenizer, ids, launcher="torchrun", processes=world)
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
