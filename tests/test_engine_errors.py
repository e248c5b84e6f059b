"""Bad input gives one clear line, and nothing is left half-written.

In Python every case raises `CqilError`; through the command lines (run in process, exactly as the
console scripts do) it exits non-zero with one line on stderr and no traceback. Engines are damaged
in private copies of one engine compiled for the module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cqil
import cqil.exporters.onnx
from cqil.compiler.cli import main as compile_cli
from cqil.errors import CqilError
from cqil.runtime.cli import run_cli
from engine_util import STD, assert_one_line_error, cli, compile_engine, open_engine

MAX_SEQ_LEN = 16
PLAN = dict(p=2, start=1, end=3, bypass=1)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama", init_std=STD, num_hidden_layers=4)


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory):
    return compile_engine(checkpoint, tmp_path_factory.mktemp("err") / "engine", max_seq_len=MAX_SEQ_LEN, **PLAN)


@pytest.fixture
def engine_dir(built, tmp_path):
    """A private copy of the module's engine, free to damage."""
    return shutil.copytree(built, tmp_path / "engine")


def manifest_of(engine_dir) -> dict:
    return json.loads((engine_dir / "manifest.json").read_text())


def write_manifest(engine_dir, manifest: dict):
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))


def refuses(engine_dir, capsys, *words, verify=True):
    """The engine fails to open: CqilError in Python, a one-line error from cqil-run."""
    with pytest.raises(CqilError) as info:
        open_engine(engine_dir, verify=verify)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w.lower() in message.lower(), f"{w!r} not in {message!r}"
    argv = [engine_dir, "--input-ids", "1,2,3", "--max-new-tokens", "2", "--threads", "1"] + ([] if verify else ["--no-verify"])
    assert_one_line_error(*cli("cqil-run", run_cli, argv, capsys)[::2], *words)
    return message


def test_the_undamaged_copy_runs(engine_dir, capsys):
    """The baseline the tests below damage: it opens, runs and cqil-run succeeds."""
    code, out, err = cli("cqil-run", run_cli, [engine_dir, "--input-ids", "1,2,3", "--max-new-tokens", "2",
                                                 "--threads", "1", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["output_ids"]) >= 1


def some_onnx(engine_dir, rank=1):
    return sorted((engine_dir / f"rank{rank}").glob("*.onnx"))[-1]


def test_missing_onnx_file(engine_dir, capsys):
    path = some_onnx(engine_dir)
    path.unlink()
    refuses(engine_dir, capsys, path.name, "missing")
    refuses(engine_dir, capsys, path.name, verify=False)  # without the checksum pass: ORT cannot open it


def test_truncated_onnx_file(engine_dir, capsys):
    path = some_onnx(engine_dir)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refuses(engine_dir, capsys, path.name, "truncated")
    refuses(engine_dir, capsys, path.name, "cannot load", verify=False)


def test_file_whose_checksum_does_not_match(engine_dir, capsys):
    path = some_onnx(engine_dir, rank=0)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    refuses(engine_dir, capsys, path.name, "sha256")


def test_manifest_from_a_newer_format_version(engine_dir, capsys):
    manifest = manifest_of(engine_dir)
    manifest["format_version"] += 1
    write_manifest(engine_dir, manifest)
    refuses(engine_dir, capsys, "format_version", "newer")


def test_manifest_missing_a_key(engine_dir, capsys):
    manifest = manifest_of(engine_dir)
    del manifest["ranks"][1]["program"]
    write_manifest(engine_dir, manifest)
    refuses(engine_dir, capsys, "ranks[1].program")


def test_segment_file_without_checksum_record(engine_dir, capsys):
    manifest = manifest_of(engine_dir)
    del manifest["files"][manifest["ranks"][1]["segments"][0]["files"][0]]
    write_manifest(engine_dir, manifest)
    refuses(engine_dir, capsys, "no checksum")


def test_onnx_file_with_an_unknown_tensor_name(engine_dir, capsys):
    """Rename a segment's input inside its ONNX file and record the new checksum: the files verify,
    but the segment no longer has the interface the manifest and the program expect."""
    import onnx

    manifest = manifest_of(engine_dir)
    rec = manifest["ranks"][1]["segments"][-1]
    old = rec["inputs"][0]["name"]
    path = engine_dir / rec["files"][0]
    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name == old:
            value.name = "renamed.tensor"
    for node in model.graph.node:
        node.input[:] = ["renamed.tensor" if n == old else n for n in node.input]
    onnx.save(model, str(path))
    manifest["files"][rec["files"][0]] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                          "bytes": path.stat().st_size}
    write_manifest(engine_dir, manifest)
    refuses(engine_dir, capsys, "unknown tensor name", "renamed.tensor")


def test_program_reading_a_tensor_no_step_produces(engine_dir, capsys):
    manifest = manifest_of(engine_dir)
    step = next(s for s in manifest["ranks"][0]["program"] if s["kind"] == "all_reduce")
    step["inputs"] = ["group7.delta"]
    write_manifest(engine_dir, manifest)
    refuses(engine_dir, capsys, "unknown tensor name", "group7.delta", verify=False)


# -- bad generation input -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(built):
    with open_engine(built) as e:
        yield e


@pytest.mark.parametrize("ids", [[[1, 2, 256]], [[-1, 2]], [[3, 4], [5, 9999]]])
def test_input_ids_outside_the_vocabulary(engine, ids):
    with pytest.raises(CqilError, match=r"outside the vocabulary \[0, 256\)"):
        engine.generate(ids, max_new_tokens=2)
    with pytest.raises(CqilError, match="outside the vocabulary"):
        engine.logits(ids)


def test_cli_input_ids_outside_the_vocabulary(built, capsys):
    argv = [built, "--input-ids", "1,2,300", "--threads", "1"]
    assert_one_line_error(*cli("cqil-run", run_cli, argv, capsys)[::2], "outside the vocabulary")
    argv = [built, "--input-ids", "1,x", "--threads", "1"]
    assert_one_line_error(*cli("cqil-run", run_cli, argv, capsys)[::2], "comma-separated integers")


def test_prompt_longer_than_the_compiled_max_length(engine, built, capsys):
    assert engine.max_seq_len == MAX_SEQ_LEN
    with pytest.raises(CqilError, match="max_seq_len 16"):
        engine.logits([list(range(MAX_SEQ_LEN + 1))])
    with pytest.raises(CqilError, match=r"prompt \(10\) \+ max_new_tokens \(7\) exceeds"):
        engine.generate([list(range(10))], max_new_tokens=7)
    assert len(engine.generate([list(range(10))], max_new_tokens=6)[0]) <= 16  # the limit itself is fine
    argv = [built, "--input-ids", ",".join(map(str, range(MAX_SEQ_LEN + 1))), "--threads", "1"]
    assert_one_line_error(*cli("cqil-run", run_cli, argv, capsys)[::2], "max_seq_len")


def test_prompt_text_without_a_tokenizer(built, capsys):
    """The tiny checkpoint has generation_config.json but no tokenizer: --prompt cannot work."""
    assert (built / "generation_config.json").is_file()
    argv = [built, "--prompt", "hello", "--threads", "1"]
    assert_one_line_error(*cli("cqil-run", run_cli, argv, capsys)[::2], "no tokenizer files")


def test_console_script_reports_one_line(built):
    """The installed `cqil-run`, as a user runs it: exit 2, one line, no traceback."""
    exe = shutil.which("cqil-run")
    cmd = [exe] if exe else [sys.executable, "-c", "from cqil.runtime.cli import run_entry; run_entry()"]
    result = subprocess.run([*cmd, str(built), "--input-ids", "1,256", "--threads", "1"],
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result.returncode, result.stderr, "cqil-run: error:", "outside the vocabulary")
    assert result.stdout == ""


# -- the compile destination --------------------------------------------------------------------


def compile_argv(checkpoint, out, *extra):
    return [checkpoint, "--p", "2", "--start", "1", "--end", "3", "--bypass", "1", "--max-seq-len", str(MAX_SEQ_LEN),
            "--no-progress", "-o", out, *extra]


def siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_output_folder_not_empty(tiny_checkpoint, tmp_path, capsys):
    small = tiny_checkpoint("llama", init_std=STD, num_hidden_layers=2)  # p=1: one segment, a quick compile
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = [small, "--p", "1", "--no-progress", "-o", out]
    assert_one_line_error(*cli("cqil-compile", compile_cli, argv, capsys)[::2], "not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    # --force replaces engines and empty folders only: a folder of user files stays as it is
    assert_one_line_error(*cli("cqil-compile", compile_cli, argv + ["--force"], capsys)[::2],
                          "not a cqil engine", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and siblings(out) == []

    (out / "notes.txt").unlink()
    code, _, err = cli("cqil-compile", compile_cli, argv, capsys)  # an empty folder needs no --force
    assert code == 0, err
    code, _, err = cli("cqil-compile", compile_cli, argv + ["--force"], capsys)  # an engine: replaced
    assert code == 0, err
    assert (out / "manifest.json").is_file()
    assert siblings(out) == []
    with open_engine(out) as engine:
        assert engine.plan.p == 1 and engine.config.num_layers == 2


class Interrupt:
    """export_segment that raises KeyboardInterrupt on its `at`-th call, as Ctrl-C would."""

    def __init__(self, at=2):
        self.at, self.calls, self.real = at, 0, cqil.exporters.onnx.export_segment

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_interrupted_compile_leaves_no_destination(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "sub" / "engine"
    interrupt = Interrupt()
    monkeypatch.setattr(cqil.exporters.onnx, "export_segment", interrupt)
    with pytest.raises(KeyboardInterrupt):
        compile_engine(checkpoint, out, **PLAN)
    assert interrupt.calls == 2  # it was interrupted half-way, after one segment was written
    assert not out.exists()
    assert siblings(out) == [], "a temporary folder was left next to the destination"


def test_interrupted_compile_keeps_the_previous_engine(built, checkpoint, tmp_path, monkeypatch, capsys):
    out = shutil.copytree(built, tmp_path / "engine")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(cqil.exporters.onnx, "export_segment", Interrupt())
    code, _, err = cli("cqil-compile", compile_cli, compile_argv(checkpoint, out, "--force", "--bypass", "0"), capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "cqil-compile: interrupted"
    assert "Traceback" not in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert siblings(out) == []
    with open_engine(out) as engine:
        assert engine.plan.bypass == 1
        assert np.isfinite(engine.logits([[1, 2, 3]])).all()
