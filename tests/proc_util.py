"""Child processes for the multi-process tests (torchrun, gloo on loopback), every wait bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def loopback_env(**extra) -> dict:
    """This process's environment for a child: one thread per process, unbuffered output, gloo
    talking over loopback only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def run_bounded(cmd, env: dict, wait: float) -> tuple[int, str, str]:
    """Run `cmd` (torchrun and its workers) in a session of its own; kill all of it after `wait` s,
    so a hang fails the test instead of CI."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    return p.returncode, out, err
