"""What docs/reliability.md promises: --force never deletes what is not an engine, a compile that is
killed leaves nothing that the next one does not sweep, a failing rank is named at once, an Engine
is safe to share between threads, the torchrun launcher owns its processes, plans must run
something in parallel, and every user mistake is one line with exit status 2.

Each case asserts the exit status, the one line (no traceback) and that nothing was lost.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import cqil
import cqil.exporters.onnx
from cqil.compiler.cli import main as compile_cli
from cqil.compiler.destination import Destination
from cqil.errors import CqilError
from cqil.runtime.cli import run_cli
from engine_util import STD, assert_one_line_error, cli, compile_engine, open_engine

FIXTURE = Path(__file__).parent / "fixtures" / "small-llama"
PLAN = dict(p=2, start=1, end=5, bypass=1)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` -> its sha256: what must survive a refused or failed command."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def strays(out: Path) -> list[str]:
    """Temporary or swapped-out folders of compiles into `out`."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama", init_std=STD, num_hidden_layers=6)


@pytest.fixture
def model(checkpoint, tmp_path):
    return Path(shutil.copytree(checkpoint, tmp_path / "model"))


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory):
    return compile_engine(checkpoint, tmp_path_factory.mktemp("rel") / "engine", max_seq_len=64, **PLAN)


def compile_args(model, out, *extra):
    return [model, "--p", "2", "--start", "1", "--end", "5", "--max-seq-len", "64", "--no-progress", "-o", out, *extra]


# -- 1. --force deletes only engines -------------------------------------------------------------

@pytest.mark.parametrize("where", ["model", "parent", "inside"])
def test_force_never_replaces_the_model(model, tmp_path, capsys, where):
    (tmp_path / "notes.txt").write_text("mine")
    out = {"model": model, "parent": tmp_path, "inside": model / "engine"}[where]
    before, notes = snapshot(model), (tmp_path / "notes.txt").read_text()
    code, _, err = cli("cqil-compile", compile_cli, compile_args(model, out, "--force"), capsys)
    assert_one_line_error(code, err, "the model folder", {"model": "is", "parent": "contains",
                                                          "inside": "lies inside"}[where])
    assert snapshot(model) == before and (tmp_path / "notes.txt").read_text() == notes
    assert not (model / "engine").exists()
    with pytest.raises(CqilError, match="model folder"):  # the Python API refuses the same
        cqil.compile(model, out, progress=False, log=lambda m: None, force=True, **PLAN)
    assert snapshot(model) == before


def test_force_refuses_a_folder_of_user_files(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.docx").write_bytes(b"precious")
    code, _, err = cli("cqil-compile", compile_cli, compile_args(model, out, "--force"), capsys)
    assert_one_line_error(code, err, "not a cqil engine", "report.docx")
    assert snapshot(out) == {"report.docx": hashlib.sha256(b"precious").hexdigest()}
    assert strays(out) == []


def test_force_through_a_symlink_and_over_a_read_only_engine(model, built, tmp_path, capsys):
    target = Path(shutil.copytree(built, tmp_path / "engines" / "v1"))
    link = tmp_path / "current"
    link.symlink_to(target)
    for p in [target, *target.rglob("*")]:  # someone made the old engine read-only
        p.chmod(0o555 if p.is_dir() else 0o444)
    code, _, err = cli("cqil-compile", compile_cli, compile_args(model, link, "--force", "--bypass", "0"), capsys)
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == target  # the link stays; its folder holds the new engine
    assert json.loads((target / "manifest.json").read_text())["plan"]["bypass"] == 0
    assert strays(target) == [] and strays(link) == []


def test_leftovers_of_dead_compiles_are_swept(model, built, tmp_path, capsys):
    out = Path(shutil.copytree(built, tmp_path / "engine"))
    dead = 2**22 + 12345  # above any pid this kernel hands out by default
    (tmp_path / f".engine.tmp-{dead}-abc123").mkdir()
    (tmp_path / f".engine.old-{dead}-abc123").mkdir()
    alive = tmp_path / f".engine.tmp-{os.getpid()}-zzz"  # a compile still running: left alone
    alive.mkdir()
    code, _, err = cli("cqil-compile", compile_cli, compile_args(model, out, "--force"), capsys)
    assert code == 0, err
    assert strays(out) == [alive.name]


def test_an_engine_left_aside_by_a_crash_is_put_back(built, model, tmp_path):
    """Where renames cannot exchange, a crash between the two leaves OUT missing: the next compile restores it."""
    aside = Path(shutil.copytree(built, tmp_path / f".engine.old-{2**22 + 7}-abc"))
    out = tmp_path / "engine"
    with pytest.raises(CqilError, match="not empty"):
        Destination(out, model, force=False)  # swept: the old engine is back, and no --force was given
    assert (out / "manifest.json").is_file() and not aside.exists()


def test_fallback_swap_restores_the_engine_when_interrupted(built, model, tmp_path, monkeypatch):
    out = Path(shutil.copytree(built, tmp_path / "engine"))
    before = snapshot(out)
    dest = Destination(out, model, force=True)
    tmp = dest.begin()
    (tmp / "manifest.json").write_text('{"format_version": 1}')
    monkeypatch.setattr("cqil.compiler.destination._exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # between moving the old engine aside and the new one in
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        dest.commit(tmp)
    monkeypatch.undo()
    dest.abort(tmp)
    assert snapshot(out) == before and strays(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGKILL, -9)])
def test_a_killed_compile_keeps_the_old_engine(built, tmp_path, sig, code):
    """SIGTERM and SIGHUP clean up like Ctrl-C; SIGKILL cannot, so the next compile sweeps."""
    out = Path(shutil.copytree(built, tmp_path / "engine"))
    before = snapshot(out)
    argv = [sys.executable, "-m", "cqil.compiler.cli", str(FIXTURE), "--p", "2", "--max-seq-len", "64",
            "--no-progress", "-o", str(out), "--force"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not strays(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert strays(out), "the compile never started writing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert snapshot(out) == before
    if sig == signal.SIGKILL:
        assert strays(out)  # nothing could clean up ...
        subprocess.run(argv[:-1] + ["--force"], check=True, capture_output=True, timeout=300)
        assert strays(out) == []  # ... until the next compile into the same place
    else:
        assert err.strip().splitlines()[-1] == f"cqil-compile: stopped by {signal.Signals(sig).name}"
        assert "Traceback" not in err
        assert strays(out) == []


# -- 2. a failing rank is named at once ----------------------------------------------------------

def test_failing_rank_is_reported_at_once(built):
    engine = open_engine(built)
    real = engine.segments[1]["seg0"]

    def broken(env):
        raise CqilError("engine: rank1/seg0.onnx failed: Got invalid dimensions for input")

    engine.segments[1]["seg0"] = broken
    t0 = time.monotonic()
    with pytest.raises(CqilError) as err:
        engine.generate([[1, 2, 3]], max_new_tokens=4)
    assert time.monotonic() - t0 < 10  # not the 600 s collective timeout
    assert str(err.value) == "rank 1: engine: rank1/seg0.onnx failed: Got invalid dimensions for input"
    engine.segments[1]["seg0"] = real  # the barrier was reset: the engine works again
    assert engine.generate([[1, 2, 3]], max_new_tokens=4) == open_engine(built).generate([[1, 2, 3]], max_new_tokens=4)


@pytest.fixture
def foreign_rank1(built, tiny_checkpoint, tmp_path):
    """An engine whose rank-1 segment comes from another model of other sizes, checksums fixed: it
    loads, and fails when it runs."""
    other = tiny_checkpoint("llama", init_std=STD, num_hidden_layers=6, hidden_size=32, intermediate_size=64)
    other_engine = compile_engine(other, tmp_path / "other", max_seq_len=64, **PLAN)
    engine = Path(shutil.copytree(built, tmp_path / "engine"))
    manifest = json.loads((engine / "manifest.json").read_text())
    seg = manifest["ranks"][1]["segments"][0]["files"][0]
    shutil.copy(other_engine / seg, engine / seg)
    data = (engine / seg).read_bytes()
    manifest["files"][seg] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (engine / "manifest.json").write_text(json.dumps(manifest))
    return engine


def test_failing_rank_through_the_cli(foreign_rank1, capsys):
    t0 = time.monotonic()
    code, _, err = cli("cqil-run", run_cli, [foreign_rank1, "--input-ids", "1,2,3", "--threads", "1"], capsys)
    assert_one_line_error(code, err, "rank 1: engine: rank1/seg", ".onnx failed", "invalid dimensions")
    assert time.monotonic() - t0 < 30


# -- 3. one Engine, many threads -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("plan", [dict(p=2, start=1, end=5, bypass=1), dict(p=4, start=1, end=5, bypass=1)])
def test_engine_is_safe_across_threads(checkpoint, tmp_path, plan):
    engine = open_engine(compile_engine(checkpoint, tmp_path / "e", max_seq_len=64, **plan))
    rng = np.random.default_rng(0)
    jobs = []  # (kind, prompt): 8 threads x 3 calls, mixing generate, logits and a Generator loop
    for i in range(24):
        prompt = rng.integers(1, 256, (1 + i % 3, 2 + i % 5)).tolist()
        jobs.append((("generate", "logits", "generator")[i % 3], prompt))

    def run(kind, prompt):
        if kind == "generate":
            return engine.generate(prompt, max_new_tokens=6)
        if kind == "logits":
            return engine.logits(prompt).tolist()
        gen = engine.generator(prompt, max_new_tokens=6)
        while not gen.done:
            gen.next_tokens()
        return gen.tokens

    expected = [run(*job) for job in jobs]
    for _ in range(5):
        results: dict[int, object] = {}

        def worker(t):
            for j in range(t, len(jobs), 8):
                results[j] = run(*jobs[j])

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert [results.get(j) for j in range(len(jobs))] == expected


# -- 4. the launcher owns its processes ----------------------------------------------------------

@pytest.fixture(scope="module")
def p2_engine(tmp_path_factory):
    return compile_engine(FIXTURE, tmp_path_factory.mktemp("launch") / "engine", p=2, start=2, end=10, bypass=1,
                          max_seq_len=2048)


def run_launcher(engine, *extra, action=None, timeout=180):
    """cqil-run --launcher torchrun in a subprocess; `action(proc, ranks)` once both ranks stream tokens.
    Returns (exit status, stdout, stderr, every process it started)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    argv = [sys.executable, "-c", "from cqil.runtime.cli import run_entry; run_entry()", str(engine),
            "--prompt", "def main(", "--max-new-tokens", "1800", "--ignore-eos", "--launcher", "torchrun", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen: dict[int, psutil.Process] = {}
    os.set_blocking(proc.stdout.fileno(), False)
    out, deadline = b"", time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(child.pid, child)
        out += proc.stdout.read() or b""
        ranks = [p for p in seen.values() if "cqil.runtime.launch" in " ".join(_cmdline(p))
                 and "torch.distributed.run" not in " ".join(_cmdline(p))]
        if action is not None and len(ranks) == 2 and len(out) > 40:
            action(proc, sorted(ranks, key=lambda p: p.environ().get("RANK", "")))
            action = None
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    rest, err = proc.communicate(timeout=30)
    time.sleep(0.5)
    return proc.returncode, (out + rest).decode(errors="replace"), err.decode(errors="replace"), list(seen.values())


def _cmdline(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def left_running(procs) -> list[int]:
    return [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, 130, "cqil-run: interrupted"),
                                             (signal.SIGTERM, 143, "cqil-run: stopped by SIGTERM")])
def test_launcher_stops_every_process_on_a_signal(p2_engine, sig, code, line):
    rc, out, err, procs = run_launcher(p2_engine, action=lambda proc, ranks: proc.send_signal(sig))
    assert rc == code and err.strip() == line
    assert len(procs) >= 3 and left_running(procs) == []  # torchrun and both ranks are gone


@pytest.mark.slow
def test_launcher_names_a_killed_rank(p2_engine):
    rc, out, err, procs = run_launcher(p2_engine, action=lambda proc, ranks: ranks[1].kill())
    assert_one_line_error(rc, err, "rank 1", "torchrun's log:", expected_code=1)
    log = err.strip().rsplit("torchrun's log: ", 1)[1].rstrip(")")
    assert "Traceback" in Path(log).read_text() or "exitcode" in Path(log).read_text()  # torchrun's noise, kept there
    assert left_running(procs) == []


@pytest.mark.slow
def test_launcher_timeout_names_a_hung_rank(p2_engine):
    t0 = time.monotonic()
    rc, out, err, procs = run_launcher(p2_engine, "--timeout", "3", action=lambda proc, ranks: ranks[1].suspend())
    assert_one_line_error(rc, err, "rank 1 stopped", expected_code=1)
    assert time.monotonic() - t0 < 100
    assert left_running(procs) == []


# -- 6. a plan must run something in parallel ----------------------------------------------------

@pytest.mark.parametrize("p, words", [(20, ("p=20 is larger than the model's 12 layers", "largest p")),
                                      (7, ("holds no group of 7", "--start 3 --end 10"))])
@pytest.mark.parametrize("mode", [["--dry-run"], ["-o", "OUT"]])
def test_plans_without_a_group_are_refused(tmp_path, capsys, p, words, mode):
    argv = [FIXTURE, "--p", str(p), *[str(tmp_path / "e") if m == "OUT" else m for m in mode]]
    assert_one_line_error(*cli("cqil-compile", compile_cli, argv, capsys)[::2], *words)
    assert not (tmp_path / "e").exists()


# -- 7, 8. user mistakes are one line, exit 2 ----------------------------------------------------

def edit_config(model: Path, **changes) -> Path:
    raw = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (model / "config.json").write_text(json.dumps(raw))
    return model


@pytest.mark.parametrize("changes, words", [
    (dict(num_hidden_layers="twelve"), ("num_hidden_layers must be a positive integer", "'twelve'")),
    (dict(num_hidden_layers=12.7), ("num_hidden_layers must be a positive integer", "12.7")),
    (dict(vocab_size=-5), ("vocab_size must be a positive integer", "-5")),
    (dict(hidden_size=66, head_dim=None), ("hidden_size=66 is not a multiple of num_attention_heads=4",)),
])
def test_bad_config_values(model, tmp_path, capsys, changes, words):
    edit_config(model, **changes)
    for argv in (compile_args(model, tmp_path / "e"), [model, "--p", "2", "--start", "1", "--end", "5", "--dry-run"]):
        assert_one_line_error(*cli("cqil-compile", compile_cli, argv, capsys)[::2], *words)


def test_index_mapping_a_tensor_to_the_wrong_shard(tmp_path, capsys):
    from cqil.testing import hf_config

    import transformers
    import torch

    model = transformers.LlamaForCausalLM(hf_config("llama", num_hidden_layers=2)).eval()
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    capsys.readouterr()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    name = "model.layers.1.mlp.down_proj.weight"
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    argv = [folder, "--p", "1", "--no-progress", "-o", tmp_path / "e"]
    assert_one_line_error(*cli("cqil-compile", compile_cli, argv, capsys)[::2], f"maps {name} to", "does not hold it")


def test_unwritable_places(model, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(*cli("cqil-compile", compile_cli, compile_args(model, tmp_path / "afile" / "x"), capsys)[::2],
                          "cannot create the folder of")
    if Path("/sys/kernel").is_dir():  # sysfs: no one may create folders in its root, root included
        code, _, err = cli("cqil-compile", compile_cli, compile_args(model, "/sys/cqil-test-engine"), capsys)
        assert_one_line_error(code, err, "cannot write into /sys")


def test_disk_full_names_the_path_and_keeps_the_old_engine(model, built, tmp_path, capsys, monkeypatch):
    out = Path(shutil.copytree(built, tmp_path / "engine"))
    before = snapshot(out)
    real = cqil.exporters.onnx.export_segment

    def full(seg, specs, path, *args, **kwargs):
        if path.name == "seg1.onnx":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(seg, specs, path, *args, **kwargs)

    monkeypatch.setattr(cqil.exporters.onnx, "export_segment", full)
    code, _, err = cli("cqil-compile", compile_cli, compile_args(model, out, "--force"), capsys)
    progress, error = err.strip().splitlines()  # the export had begun: its progress line, then the error
    assert progress.startswith("segments per rank:")
    assert_one_line_error(code, error, "no space left", "seg1.onnx", "nothing was replaced")
    assert snapshot(out) == before and strays(out) == []


@pytest.fixture
def engine_copy(built, tmp_path):
    return Path(shutil.copytree(built, tmp_path / "engine"))


def edit_manifest(engine: Path, edit) -> Path:
    manifest = json.loads((engine / "manifest.json").read_text())
    edit(manifest)
    (engine / "manifest.json").write_text(json.dumps(manifest))
    return engine


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["model"].pop("vocab_size"), ("vocab_size missing",)),
    (lambda m: m["model"].update(colour="blue"), ("unknown config field(s) colour",)),
    (lambda m: m.update(format_version=-1), ("format_version must be >= 1",)),
    (lambda m: m.update(dtype="int8"), ("dtype must be one of", "'int8'")),
    (lambda m: m["ranks"][1]["program"][0].update(kind="teleport"), ("ranks[1].program[0].kind", "'teleport'")),
    (lambda m: m["ranks"][1]["segments"][0]["inputs"][0].update(shape=["batch", "x"]),
     ("ranks[1].segments[0].inputs[0].shape[1]", "'x'")),
    (lambda m: next(t for s in m["ranks"][1]["segments"] for t in s["outputs"] if t["name"] == "group0.delta")
     .update(shape=["batch", "sequence", 999]), ("all_reduce", "gets tensors of different dtype/shape")),
    (lambda m: m["ranks"][0]["segments"][0]["files"].__setitem__(0, "../../etc/passwd"),
     ("must be a path inside the engine directory",)),
])
def test_bad_manifests(engine_copy, capsys, edit, words):
    edit_manifest(engine_copy, edit)
    code, _, err = cli("cqil-run", run_cli, [engine_copy, "--input-ids", "1,2,3", "--no-verify"], capsys)
    assert_one_line_error(code, err, *words)


@pytest.mark.parametrize("argv, words", [
    (["--input-ids", "1,,2"], ("comma-separated integers",)),
    (["--input-ids", "9223372036854775808"], ("outside the vocabulary",)),
    (["--prompt-file", "PROMPT"], ("is not UTF-8 text",)),
])
def test_bad_prompts(built, tmp_path, capsys, argv, words):
    (tmp_path / "prompt.txt").write_bytes(b"caf\xe9 \xff")
    argv = [str(tmp_path / "prompt.txt") if a == "PROMPT" else a for a in argv]
    assert_one_line_error(*cli("cqil-run", run_cli, [built, *argv], capsys)[::2], *words)


def test_prompt_with_undecodable_bytes_on_the_command_line(tmp_path):
    engine = compile_engine(FIXTURE, tmp_path / "e", p=1, max_seq_len=64)
    run = subprocess.run([os.fsencode(sys.executable), b"-c", b"from cqil.runtime.cli import run_entry; run_entry()",
                          os.fsencode(engine), b"--prompt", b"caf\xe9"], capture_output=True, timeout=120)
    assert_one_line_error(run.returncode, run.stderr.decode(), "--prompt is not valid UTF-8")


@pytest.mark.parametrize("ids, mask, words", [
    ([[1, 2.5]], None, "holds 2.5, which is not an integer token id"),
    ([["7", 1]], None, "holds '7'"),
    ([[True, 1]], None, "holds True"),
    (np.array([[1, 2]]), np.array([[1, 2]]), "only 0 (padding) and 1 (token), got values [2]"),
    (np.array([[1, 2]]), np.array([[0, 0]]), "row(s) [0] hold no token"),
    ([[1, 2]], [[1, 1]], "attention_mask goes with an array"),
])
def test_ids_and_masks_are_not_coerced(built, ids, mask, words):
    engine = open_engine(built)
    with pytest.raises(CqilError) as err:
        engine.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert words in str(err.value)


def test_max_seq_len_zero_is_refused(model, tmp_path, capsys):
    for extra in (["--dry-run"], ["-o", tmp_path / "e"]):
        argv = [model, "--p", "2", "--start", "1", "--end", "5", "--max-seq-len", "0", *extra]
        assert_one_line_error(*cli("cqil-compile", compile_cli, argv, capsys)[::2], "--max-seq-len must be a positive")
