"""GPU entry points, checked on the CPU: flags on every command, clear refusals where CUDA is
missing, the ONNX Runtime backend's IO binding (bit-identical to session.run) and its per-rank
CUDA provider options, the NCCL launcher's device choice and watchdog, --dtype auto and cqil-check's
dtype tolerances, and the GPU check's dry run. What needs a real GPU is in tools/gpu_check.py and
the `gpu`-marked tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import cqil
from cqil.compiler.cli import main as compile_cli
from cqil.errors import CqilError
from cqil.runtime.cli import run_cli
from cqil.runtime.launch import rank_device
from cqil.verify import check_cli
from engine_util import STD, assert_one_line_error, cli, compile_engine

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "small-llama"
PLANS = {"p1": dict(p=1), "p2_d1": dict(p=2, start=1, end=5, bypass=1), "p4_d1": dict(p=4, start=1, end=5, bypass=1)}


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama", init_std=STD, num_hidden_layers=6)
    root = tmp_path_factory.mktemp("gpu-paths")
    return {name: compile_engine(ckpt, root / name, max_seq_len=64, formats=("onnx", "torch"), **plan)
            for name, plan in PLANS.items()}


# -- ONNX Runtime: IO binding -------------------------------------------------------------------

def step_logits(engine, ids, steps: int) -> list[np.ndarray]:
    """Prefill, then `steps` greedy decode steps through a Generator: the logits of every step."""
    gen = engine.generator(ids)
    out = [gen.logits.copy()]
    for _ in range(steps):
        gen.append_tokens(gen.logits.argmax(-1)[:, None])
        out.append(gen.logits.copy())
    return out


@pytest.mark.parametrize("name", list(PLANS))
def test_io_binding_is_bit_identical_to_session_run(engines, name):
    ids = [[5, 17, 42, 7, 99, 3], [8, 1, 2]]
    bound = step_logits(cqil.load(engines[name], threads=1, io_binding=True), ids, 32)
    plain = step_logits(cqil.load(engines[name], threads=1, io_binding=False), ids, 32)
    assert len(bound) == 33 and all(np.array_equal(a, b) for a, b in zip(bound, plain))


# -- ONNX Runtime on CUDA: what each rank's sessions are given ------------------------------------

class _Stream:
    count = 0

    def __init__(self, device=None):
        _Stream.count += 1
        self.cuda_stream, self.device = 1000 + _Stream.count, device


def test_each_rank_gets_its_cuda_device(engines, monkeypatch):
    import onnxruntime as ort

    made = []
    real = ort.InferenceSession

    def session(path, opts, providers):
        made.append((Path(path).parent.name, providers))
        return real(path, opts, providers=["CPUExecutionProvider"])  # a real session, for its interface

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "Event", lambda: object())
    engine = cqil.load(engines["p2_d1"], threads=1, devices="cuda:1,cuda:0", tensorrt_ep=True)
    assert {rank for rank, _ in made} == {"rank0", "rank1"}
    for folder, providers in made:
        rank = int(folder.removeprefix("rank"))
        want = 1 - rank  # --devices cuda:1,cuda:0
        stream = engine.runners[rank].stream.cuda_stream
        assert providers == [("TensorrtExecutionProvider", {"device_id": want}),
                             ("CUDAExecutionProvider", {"device_id": want, "has_user_compute_stream": "1",
                                                        "user_compute_stream": str(stream)}),
                             "CPUExecutionProvider"]
    assert engine.runners[0].device == torch.device("cuda", 1)
    assert type(engine.collectives).__name__ == "DeviceCollectives"


# -- refusals, one line each ----------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
@pytest.mark.parametrize("backend, words", [
    ("onnxruntime", ("has no CUDA execution provider", "pip install -e '.[gpu]'")),
    ("torch", ("torch sees no CUDA device", "--devices cpu")),
])
def test_cuda_refused_without_it(engines, capsys, backend, words):
    argv = [engines["p2_d1"], "--input-ids", "1,2,3", "--backend", backend, "--devices", "cuda"]
    assert_one_line_error(*cli("cqil-run", run_cli, argv, capsys)[::2], *words)


def test_more_devices_than_exist(engines, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CqilError, match=r"rank 1 asks for cuda:1, but only 1 CUDA device\(s\) are visible"):
        cqil.load(engines["p2_d1"], backend="torch", devices="cuda:0,cuda:1")


def test_launcher_devices(monkeypatch):
    assert rank_device(None, 0, 2) == "cpu" and rank_device("cuda:1,cuda:0", 0, 2) == "cuda:1"
    with pytest.raises(CqilError, match="NCCL cannot put two ranks on one GPU"):
        rank_device("cuda:0,cuda:0", 1, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CqilError, match="local ranks would share cuda:0"):
        rank_device("cuda", 0, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [rank_device("cuda", r, 2) for r in (0, 1)] == ["cuda:0", "cuda:1"]
    with pytest.raises(CqilError, match="lists 3 devices, this node runs 2 ranks"):
        rank_device("cuda:0,cuda:1,cuda:2", 0, 2)


def test_flags_reach_the_engine(engines, capsys):
    """--backend / --devices on cqil-run and cqil-check; the launcher takes every flag cqil-run hands it."""
    from cqil.runtime.cli import run_parser
    from cqil.runtime.launch import parser as launch_parser

    code, out, err = cli("cqil-run", run_cli, [engines["p2_d1"], "--input-ids", "1,2,3", "--max-new-tokens", "4",
                                                "--backend", "torch", "--devices", "cpu", "--json"], capsys)
    assert code == 0, err
    ort = cqil.load(engines["p2_d1"], threads=1).generate([[1, 2, 3]], max_new_tokens=4)
    assert json.loads(out)["output_ids"] == ort[0][3:]
    model = json.loads((engines["p2_d1"] / "manifest.json").read_text())["source"]["model_dir"]
    code, out, err = cli("cqil-check", check_cli, [engines["p2_d1"], "--model", model, "--steps", "8",
                                                    "--backend", "torch", "--devices", "cpu"], capsys)
    assert code == 0 and out.strip().endswith("PASSED"), out + err
    flags = {o for a in run_parser()._actions for o in a.option_strings} - {"--launcher"}
    assert flags <= {o for a in launch_parser()._actions for o in a.option_strings}


def test_nccl_watchdog_names_a_hung_rank(tmp_path):
    """NCCL aborts a process on timeout, so cqil's own watchdog must name the hung rank first. Run here
    over gloo (its own timeout set far beyond the watchdog's)."""
    script = textwrap.dedent("""
        import os, sys, time, numpy as np
        from cqil.runtime.dist import DistCollectives
        rank = int(os.environ["RANK"])
        c = DistCollectives(rank, 2, timeout=2, watchdog=True)
        if rank == 1:
            time.sleep(120)
        c(0, "all_reduce", np.ones(4, np.float32))
    """)
    port = 29600 + os.getpid() % 300
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    t0 = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 1 and time.monotonic() - t0 < 40
    assert err.strip().splitlines()[-1].startswith("error: rank 0: all_reduce (collective #1) failed: rank 1 stopped")


# -- dtype auto and cqil-check's tolerances -------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "engine"
    assert compile_cli([str(FIXTURE), "--p", "2", "--start", "2", "--end", "10", "--bypass", "1",
                        "--max-seq-len", "64", "--no-progress", "-o", str(out)]) == 0
    return out


def test_dtype_auto_takes_the_checkpoint_dtype(fp16_engine):
    assert json.loads((fp16_engine / "manifest.json").read_text())["dtype"] == "float16"


def test_check_passes_a_correct_fp16_engine_by_default(fp16_engine, capsys):
    code, out, err = cli("cqil-check", check_cli, [fp16_engine, "--model", FIXTURE, "--steps", "16", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["passed"] and (report["atol"], report["rtol"]) == (5e-2, 1e-2), err


def test_check_fails_a_corrupted_fp16_engine_and_json_still_parses(fp16_engine, tmp_path, capsys):
    import hashlib

    engine = Path(shutil.copytree(fp16_engine, tmp_path / "engine"))
    manifest = json.loads((engine / "manifest.json").read_text())
    rel = manifest["ranks"][1]["segments"][-1]["files"][0]  # a rank-1 group layer
    model = onnx.load(str(engine / rel))
    weight = next(t for t in model.graph.initializer if t.name.startswith("onnx::MatMul"))  # a projection
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(model, str(engine / rel))
    data = (engine / rel).read_bytes()
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (engine / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = cli("cqil-check", check_cli, [engine, "--model", FIXTURE, "--steps", "8", "--json"], capsys)
    report = json.loads(out)  # only the report on stdout, whatever polygraphy logs
    assert code == 1 and not report["passed"] and not report["outputs"]["logits"]["passed"]


def test_near_ties_may_swap():
    from cqil.verify import first_disagreement

    ref = np.array([[3, 4]])
    logits = np.zeros((1, 2, 6))
    logits[0, 0, 3], logits[0, 1, 4], logits[0, 1, 5] = 9.0, 5.0, 4.99
    assert first_disagreement(np.array([[3, 4]]), ref, logits, 0.05, 0.0) == (None, True)
    assert first_disagreement(np.array([[3, 5]]), ref, logits, 0.05, 0.0) == (1, True)  # 0.01 apart: a tie
    assert first_disagreement(np.array([[1, 5]]), ref, logits, 0.05, 0.0) == (0, False)  # 9 vs 0: a fault


# -- the GPU check's dry run ----------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """`PYTHONPATH=. python tools/gpu_check.py --devices cpu` runs every section it can, no install needed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "tools/gpu_check.py", "--devices", "cpu", "--out", str(tmp_path / "r.json"),
                          "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["checks"] and all(c["passed"] for c in report["checks"])
    assert {"nccl", "tensorrt", "onnxruntime_cuda"} <= set(report["unreachable"])
    assert "| engine |" in run.stdout  # a markdown table after the section


def test_eval_takes_backend_flags_for_engines(engines, tmp_path, capsys):
    from cqil.quality.cli import eval_main

    data = tmp_path / "ids.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, 200))
    code, out, err = cli("cqil-eval", eval_main, [engines["p2_d1"], "--data", data, "--seq-len", "32", "--json",
                                                   "--backend", "torch", "--devices", "cpu"], capsys)
    assert code == 0, err
    torch_ppl = json.loads(out)["perplexity"]
    code, out, err = cli("cqil-eval", eval_main, [engines["p2_d1"], "--data", data, "--seq-len", "32", "--json"], capsys)
    assert abs(json.loads(out)["perplexity"] - torch_ppl) < 1e-3 * torch_ppl
    model = json.loads((engines["p2_d1"] / "manifest.json").read_text())["source"]["model_dir"]
    code, _, err = cli("cqil-eval", eval_main, [model, "--data", data, "--devices", "cpu"], capsys)
    assert_one_line_error(code, err, "run an engine directory", "--device")
