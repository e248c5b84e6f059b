"""Ranks as processes: tiny engines run by real `python -m cqil.runtime.launch` processes (gloo).

Runs go through torchrun, or start each rank directly with torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR/PORT): without torchrun's agent, which stops every worker as soon as
one fails, the failure tests see what each survivor reports itself. Every wait is bounded, so a
hang fails the test instead of CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import cqil
from cqil.errors import CqilError
from cqil.runtime import launch
import proc_util
from proc_util import loopback_env

PROMPT = [5, 17, 42, 7, 99, 3]
NEW = 10
WAIT = 150  # seconds: the outer bound of any one launch (imports dominate on a loaded machine)


PLANS = {"d0": dict(p=2, start=2, end=6, bypass=0),   # p=2 without bypass
         "d1": dict(p=2, start=2, end=6, bypass=1),   # p=2 with bypass
         "p3": dict(p=3, start=2, end=8, bypass=0)}   # three ranks, for the heartbeat diagnosis


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_checkpoint):
    """engines[name] -> an engine of PLANS[name], compiled on first use; 8 layers, so groups exist."""
    root, built = tmp_path_factory.mktemp("dist-engines"), {}

    class Engines:
        def __getitem__(self, name):
            if name not in built:
                ckpt = tiny_checkpoint("llama", init_std=0.1, num_hidden_layers=8)
                built[name] = cqil.compile(ckpt, root / name, progress=False, log=lambda *a: None, **PLANS[name])
            return built[name]

    return Engines()


TESTS = str(Path(__file__).parent)  # on the children's path: tests/launch_hooks.py, the launcher with test hooks


def child_env(**extra) -> dict:
    """The test hooks' CQIL_TEST_* variables only as `extra` gives them."""
    env = {k: v for k, v in loopback_env().items() if not k.startswith("CQIL_TEST_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH")) if p)
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_direct(engine, n: int, args: list[str], grace: float = 10.0, **env) -> list[dict]:
    """Start ranks 0..n-1 as plain processes; returns per rank {rc, out, err, t} (t: seconds to exit).

    Once a rank has failed, the others are killed when none has ended for `grace` seconds.
    """
    port = free_port()
    procs, logs = [], []
    t0 = time.monotonic()
    for r in range(n):
        e = child_env(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
        logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
        procs.append(subprocess.Popen([sys.executable, "-m", "launch_hooks", str(engine), *args], env=e,
                                      stdout=logs[-1][0], stderr=logs[-1][1], text=True))
    ended, failed = {}, False
    while len(ended) < n and time.monotonic() - t0 < WAIT:
        for r, p in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.monotonic() - t0
                failed |= p.returncode != 0
        if failed and time.monotonic() - t0 - max(ended.values()) > grace:
            break
        time.sleep(0.05)
    results = []
    for r, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        out, err = (f.seek(0) or f.read() for f in logs[r])
        results.append({"rc": p.returncode, "out": out, "err": err, "t": ended.get(r, time.monotonic() - t0)})
    return results


def run_bounded(cmd) -> tuple[int, str, str]:
    return proc_util.run_bounded(cmd, child_env(), WAIT)


def in_process(engine):
    with cqil.load(engine, threads=2) as e:
        tokens = e.generate([PROMPT], max_new_tokens=NEW)[0][len(PROMPT):]
        logits = e.logits([PROMPT])
    return tokens, logits


def check_reports(engine: Path, folder: Path, n: int):
    """Each process holds only its rank's segments: from its live sessions, not from timings."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((engine / "manifest.json").read_text())
    pids = set()
    for rec in manifest["ranks"]:
        r = rec["rank"]
        report = json.loads((folder / f"rank{r}.json").read_text())
        pids.add(report["pid"])
        assert report["ranks"] == [r]
        assert report["session_files"] == sorted(s["files"][0] for s in rec["segments"])
        assert report["weight_bytes"] == {str(r): sum(s["weight_bytes"] for s in rec["segments"])}
        held = sum(numpy_helper.to_array(t).nbytes for f in report["session_files"]
                   for t in onnx.load(str(engine / f)).graph.initializer)
        # the exporter counts parameters; the files may fold a few tiny constants differently
        assert held == pytest.approx(report["weight_bytes"][str(r)], rel=0.01)
    assert len(pids) == n


@pytest.mark.slow
@pytest.mark.parametrize("which, launcher", [("d0", "direct"), ("d1", "torchrun")])
def test_processes_match_in_process_engine(engines, tmp_path, which, launcher):
    engine = engines[which]
    logits_file, reports = tmp_path / "logits.npy", tmp_path / "reports"
    args = ["--input-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--ignore-eos", "--json",
            "--timeout", "60", "--dump-logits", str(logits_file), "--report-dir", str(reports)]
    if launcher == "torchrun":
        rc, out, err = run_bounded(launch.torchrun_command(engine, 2, args, module="launch_hooks"))
        assert rc == 0, err[-3000:]
    else:
        ranks = launch_direct(engine, 2, args)
        assert [r["rc"] for r in ranks] == [0, 0], [r["err"][-2000:] for r in ranks]
        assert ranks[1]["out"] == ""  # only rank 0 prints
        out = ranks[0]["out"]
    result = json.loads(out.strip().splitlines()[-1])
    tokens, logits = in_process(engine)
    assert result["output_ids"] == tokens
    assert result["processes"] == 2 and result["new_tokens"] == NEW and result["ms_per_token"] > 0
    got = np.load(logits_file)
    assert got.shape == logits.shape
    assert np.abs(got - logits).max() <= 1e-5
    check_reports(engine, reports, 2)


@pytest.mark.slow
def test_cqil_run_launcher_torchrun(engines):
    """`cqil-run --launcher torchrun` hands its flags to one process per rank, same tokens."""
    engine = engines["d0"]
    rc, out, err = run_bounded([sys.executable, "-c", "from cqil.runtime.cli import run_entry; run_entry()",
                                str(engine), "--input-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                                str(NEW), "--ignore-eos", "--json", "--launcher", "torchrun"])
    assert rc == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["launcher"] == "torchrun" and result["processes"] == 2
    assert result["output_ids"] == in_process(engine)[0]


@pytest.mark.slow
def test_rank_that_exits_is_named(engines):
    args = ["--input-ids", "1,2,3", "--max-new-tokens", "8", "--json", "--timeout", "30"]
    r0, r1 = launch_direct(engines["d1"], 2, args, CQIL_TEST_DIE_RANK="1", CQIL_TEST_DIE_AFTER_STEPS="2")
    assert r1["rc"] == 1 and "exit after 2 token(s)" in r1["err"]
    assert r0["rc"] == 1 and r0["out"] == ""  # a victim of another rank's failure, not bad input
    assert "cqil-launch[rank 0]: error: rank 0:" in r0["err"] and "rank 1 stopped" in r0["err"]
    assert r0["t"] - r1["t"] < 30  # a broken connection is noticed at once, not at the timeout


@pytest.mark.slow
def test_hung_rank_is_named_among_three(engines):
    timeout = 4
    args = ["--input-ids", "1,2,3", "--max-new-tokens", "8", "--json", "--timeout", str(timeout)]
    ranks = launch_direct(engines["p3"], 3, args, CQIL_TEST_DIE_RANK="2", CQIL_TEST_DIE_AFTER_STEPS="2",
                          CQIL_TEST_DIE_HOW="hang", grace=4)
    assert "hang after 2 token(s)" in ranks[2]["err"] and ranks[2]["rc"] < 0  # killed by launch_direct
    for r in (0, 1):
        assert ranks[r]["rc"] == 1, ranks[r]["err"][-2000:]
        assert f"rank {r}:" in ranks[r]["err"] and "rank(s) 2 hang before this collective" in ranks[r]["err"]
        assert ranks[r]["t"] < ranks[2]["t"]  # ended by --timeout, not killed by the test


def test_world_size_must_match_the_plan(engines):
    args = [str(engines["d0"]), "--input-ids", "1,2"]
    with pytest.raises(CqilError, match=r"WORLD_SIZE is 3 but .* compiled for p=2"):
        launch.main(args, env={"RANK": "0", "WORLD_SIZE": "3"})
    with pytest.raises(CqilError, match="start this module with torchrun"):
        launch.main(args, env={})


def test_torchrun_command():
    cmd = launch.torchrun_command("eng", 4, ["--input-ids", "1,2", "--json"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd
    assert cmd[cmd.index("-m", 3):] == ["-m", "cqil.runtime.launch", "eng", "--input-ids", "1,2", "--json"]
    # every flag cqil-run hands over (all but --launcher) is accepted by the launcher
    from cqil.runtime.cli import run_parser

    flags = {o for a in run_parser()._actions for o in a.option_strings} - {"--launcher"}
    assert flags <= {o for a in launch.parser()._actions for o in a.option_strings}
