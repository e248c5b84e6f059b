"""Data-parallel cqil-finetune: `--launcher torchrun` with 2 gloo processes on loopback equals one
process that takes the whole step's windows (same losses; adapters within float tolerance).

The two processes each take 1 window x 2 accumulated micro-batches, so DDP's deferred all-reduce
(no_sync) is exercised too. Every wait is bounded: a hang fails the test instead of CI.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from cqil.cli_util import run_main
from cqil.quality import cli
import proc_util
from proc_util import loopback_env

WAIT = 240  # seconds: torchrun and two processes importing torch, transformers and peft on a loaded machine


def flags(model_dir, data, out, *extra):
    return [str(model_dir), "--p", "2", "--start", "1", "--end", "5", "--bypass", "1", "--data", str(data),
            "--seq-len", "32", "--steps", "3", "--lr", "1e-2", "--rank", "4", "--alpha", "8", "--save-every", "2",
            "--schedule", "cosine", "-o", str(out), *extra]


def run_bounded(cmd) -> tuple[int, str, str]:
    return proc_util.run_bounded(cmd, loopback_env(), WAIT)


def log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_checkpoint, tmp_path, capsys):
    model_dir = tiny_checkpoint("llama", init_std=0.1)
    data = tmp_path / "ids.npy"
    np.save(data, torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(1)).numpy())

    assert run_main("cqil-finetune", cli.finetune_main, flags(model_dir, data, tmp_path / "one", "--batch", "4")) == 0
    capsys.readouterr()
    rc, out, err = run_bounded([sys.executable, "-m", "cqil.quality.finetune",
                                *flags(model_dir, data, tmp_path / "two", "--batch", "1", "--grad-accum", "2"),
                                "--launcher", "torchrun", "--nproc-per-node", "2"])
    assert rc == 0, err[-3000:]
    assert out.count("wrote adapter") == 1  # rank 0 alone reports and writes
    assert "2 process(es)" in err and "4 windows" not in err

    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3] and [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == a["lr"]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=5e-5, msg=name)
    state = json.loads((tmp_path / "two" / "checkpoint" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["windows_per_step"] == 4
    assert not list((tmp_path / "two").glob(".*"))  # no temporary folders left behind
