"""libcqil, the C/C++ runtime (cqil/native): built by `cqil-build-native` once per session, run on the
fixture's AOTI engines (compiled once, shared with test_aoti.py) through its C API (ctypes, in this
process), `cqil-run-native` and two C programs; against the Python ONNX Runtime engine (same greedy
tokens, logits within 1e-4) and the Python aoti backend (the same bits on the same packages).
Bad input is an error status and one line, never a crash; the C API test runs under AddressSanitizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import cqil
from aoti_util import (PLANS, Engine, Lib, NativeError, aoti_engines, engine_copy, native,  # noqa: F401  (fixtures)
                       native_asan, rewrite, run_native)
from cqil.runtime.cli import run_cli
from engine_util import cli

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 301, 302], [40, 41, 42, 43, 44]]
STEPS = 32
ATOL = 1e-4
OK, INVALID_ARGUMENT, ENGINE_ERROR, RUNTIME_ERROR, STATE_ERROR = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def lib(native):
    return Lib(native / "libcqil.so")


def greedy(gen, steps=STEPS):
    return np.stack([gen.next_tokens() for _ in range(steps)], 1), gen.logits


def test_build_leaves_the_library_headers_and_program(native):
    for name in ("libcqil.so", "include/cqil.h", "include/cqil.hpp", "cqil-run-native"):
        assert (native / name).is_file(), name
    assert os.access(native / "cqil-run-native", os.X_OK)
    assert (native / "build" / "cqil-generate").is_file() and (native / "build" / "cqil-c-api-test").is_file()


@pytest.mark.parametrize("plan", list(PLANS))
def test_same_tokens_and_logits_as_the_python_onnx_engine(lib, aoti_engines, plan):
    engine_dir = aoti_engines(plan)
    with cqil.load(engine_dir, threads=1) as ort:
        want = [greedy(ort.generator(PROMPTS, max_new_tokens=STEPS))] + [
            greedy(ort.generator([p], max_new_tokens=STEPS)) for p in PROMPTS]
    engine = Engine(lib, engine_dir)
    try:
        batch = greedy(engine.generator(PROMPTS, max_new_tokens=STEPS))
        singles = [greedy(engine.generator([p], max_new_tokens=STEPS)) for p in PROMPTS]
    finally:
        engine.close()
    for (tokens, logits), (want_tokens, want_logits) in zip([batch, *singles], want):
        np.testing.assert_array_equal(tokens, want_tokens)
        assert np.abs(logits - want_logits).max() < ATOL
    # a batch of ragged prompts (left-padded) gives what each prompt gives alone
    np.testing.assert_array_equal(batch[0], np.concatenate([t for t, _ in singles]))


def test_the_same_bits_as_the_python_aoti_backend(lib, aoti_engines):
    """Same packages, same rank-ordered sums, one thread each: bit-identical logits."""
    engine_dir = aoti_engines("p2")
    with cqil.load(engine_dir, threads=1, backend="aoti") as py:
        want_tokens, want_logits = greedy(py.generator(PROMPTS, max_new_tokens=8), 8)
    engine = Engine(lib, engine_dir)
    tokens, logits = greedy(engine.generator(PROMPTS, max_new_tokens=8), 8)
    engine.close()
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(logits, want_logits)


def test_sampling_with_a_seed_repeats(lib, native, aoti_engines):
    engine = Engine(lib, aoti_engines("p2"))
    try:
        def sample(seed):
            gen = engine.generator(PROMPTS, max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=seed)
            return greedy(gen, 16)[0]
        first, again, other = sample(7), sample(7), sample(8)
        np.testing.assert_array_equal(first, again)
        assert (first != other).any()
        greedy_tokens = greedy(engine.generator(PROMPTS, max_new_tokens=16), 16)[0]
        assert (first != greedy_tokens).any()
    finally:
        engine.close()
    run = lambda seed: run_native(native, aoti_engines("p1"), "--input-ids", "5,6,7", "--max-new-tokens", 12,
                                  "--do-sample", "--temperature", 0.8, "--seed", seed, "--json", "--threads", 1)
    a, b = run(3), run(3)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["output_ids"] == json.loads(b.stdout)["output_ids"]


def test_generator_mirrors_the_python_one(lib, aoti_engines):
    """eos, append_tokens (a new turn, ragged), rewind, tokens: as cqil.runtime.generator.Generator
    (driven here over the same packages, so any difference is the Generator's)."""
    engine_dir = aoti_engines("p1")
    with cqil.load(engine_dir, threads=1, backend="aoti") as py:
        ref = py.generator(PROMPTS[:2], max_new_tokens=6)
        first = [ref.next_tokens() for _ in range(2)]
        eos = int(first[1][0])  # row 0's second token ends row 0 from then on
    engine = Engine(lib, engine_dir)
    try:
        gen = engine.generator(PROMPTS[:2], max_new_tokens=6, eos=[eos])
        with cqil.load(engine_dir, threads=1, backend="aoti") as py:
            want = py.generator(PROMPTS[:2], max_new_tokens=6, eos_token_id=eos)
            for _ in range(6):
                np.testing.assert_array_equal(gen.next_tokens(), want.next_tokens())
            assert [gen.tokens(b) for b in range(2)] == want.tokens
            assert gen.done and want.done
            gen.append_tokens([[11, 12], [13]])
            want.append_tokens([[11, 12], [13]])
            np.testing.assert_array_equal(gen.next_tokens(), want.next_tokens())
            gen.rewind(3)
            want.rewind(3)
            with pytest.raises(NativeError) as e:
                gen.next_tokens()
            assert e.value.status == STATE_ERROR and "after a rewind" in e.value.message
            gen.append_tokens([[7], [8]])
            want.append_tokens([[7], [8]])
            assert np.abs(gen.logits - want.logits).max() < ATOL
            assert [gen.tokens(b) for b in range(2)] == want.tokens
    finally:
        engine.close()


def test_threads_share_an_engine(lib, aoti_engines):
    """Generators on one engine in several threads each get what they get alone (cqil.h's promise)."""
    engine = Engine(lib, aoti_engines("p2"))
    try:
        alone = {i: greedy(engine.generator([p], max_new_tokens=12), 12)[0] for i, p in enumerate(PROMPTS)}
        results, errors = {}, []

        def work(i):
            try:
                for _ in range(3):
                    results.setdefault(i, []).append(greedy(engine.generator([PROMPTS[i]], max_new_tokens=12), 12)[0])
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for i, runs in results.items():
            for tokens in runs:
                np.testing.assert_array_equal(tokens, alone[i])
    finally:
        engine.close()


# -- cqil-run-native --------------------------------------------------------------------------


def test_run_native_prints_what_cqil_run_prints(native, aoti_engines, capsys):
    engine = aoti_engines("p2")
    args = ["--input-ids", "5,6,7,8", "--max-new-tokens", "10", "--json", "--threads", "1"]
    out = run_native(native, engine, *args)
    assert out.returncode == 0, out.stderr
    code, ref, err = cli("cqil-run", run_cli, [engine, *args], capsys)
    assert code == 0, err
    got, want = json.loads(out.stdout), json.loads(ref)
    assert set(got) == set(want) - {"text"}  # libcqil has no tokenizer
    assert got["output_ids"] == want["output_ids"] and got["stopped"] == want["stopped"]
    streamed = run_native(native, engine, "--input-ids", "5,6,7,8", "--max-new-tokens", "10", "--threads", "1")
    assert [int(t) for t in streamed.stdout.split()] == got["output_ids"]
    assert "ms/token" in streamed.stderr


@pytest.mark.parametrize("args, words", [
    (["--input-ids", "1,,2"], ["comma-separated integers"]),
    (["--input-ids", "1,99999"], ["outside the vocabulary"]),
    (["--input-ids", ",".join(["1"] * 129)], ["longer than the engine's max_seq_len 128"]),
    (["--input-ids", "1,2", "--max-new-tokens", "200"], ["exceeds the engine's max_seq_len"]),
    (["--input-ids", "1,2", "--devices", "tpu"], ["'tpu' is not a device"]),
    (["--input-ids", "1,2", "--devices", "cuda"], ["cuda"]),
    (["--input-ids", "1,2", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_run_native_bad_input_is_one_line(native, aoti_engines, args, words):
    out = run_native(native, aoti_engines("p1"), *args)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cqil-run-native: error: "), out.stderr
    for w in words:
        assert w in lines[0], lines[0]


def damaged(src: Path, tmp_path: Path, name: str, damage) -> Path:
    dst = engine_copy(src, tmp_path / name)
    damage(dst)
    return dst


def bad_engines(engine_dir: Path, tmp_path: Path) -> dict[str, tuple[Path, list, str]]:
    """name -> (engine dir, extra cqil-run-native flags, words its error names)."""
    def corrupt(d):
        data = bytearray((d / "rank1/seg1.pt2").read_bytes())
        data[len(data) // 2] ^= 0xFF
        rewrite(d / "rank1/seg1.pt2", bytes(data))

    def truncate(d):
        rewrite(d / "rank0/seg0.pt2", (d / "rank0/seg0.pt2").read_bytes()[:4096])

    def edit(change):
        def apply(d):
            m = json.loads((d / "manifest.json").read_text())
            change(m)
            (d / "manifest.json").write_text(json.dumps(m))  # a copy of its own (engine_copy)
        return apply

    return {
        "missing": (tmp_path / "nowhere", [], "is not a directory"),
        "no-segment": (damaged(engine_dir, tmp_path, "no-segment", lambda d: (d / "rank1/seg0.pt2").unlink()), [],
                       "rank1/seg0.pt2 is missing"),
        "checksum": (damaged(engine_dir, tmp_path, "checksum", corrupt), [], "does not match its sha256"),
        "unloadable": (damaged(engine_dir, tmp_path, "unloadable", truncate), ["--no-verify"], "cannot load rank0/seg0.pt2"),
        "newer": (damaged(engine_dir, tmp_path, "newer", edit(lambda m: m.update(format_version=99))), [],
                  "format_version 99"),
        "torch": (damaged(engine_dir, tmp_path, "torch", edit(lambda m: m["aoti"].update(torch="2.12.0"))), [],
                  "built by torch 2.12.0"),
        "typed": (damaged(engine_dir, tmp_path, "typed", edit(lambda m: m["plan"].update(replicate_outer="yes"))), [],
                  "manifest.json: [json.exception.type_error"),
    }


def test_bad_engines_are_one_line_errors(native, aoti_engines, tmp_path):
    for name, (engine, flags, words) in bad_engines(aoti_engines("p2"), tmp_path).items():
        out = run_native(native, engine, "--input-ids", "1,2", *flags)
        assert out.returncode == 2, (name, out)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (name, out.stderr)


def test_a_failing_rank_is_named_and_nothing_hangs(lib, aoti_engines, tmp_path):
    """rank 1's second package swapped for its first (which takes other inputs): the step fails on
    rank 1, rank 0 stops waiting at once, the engine stays usable for the next call."""
    bad = damaged(aoti_engines("p2"), tmp_path, "swapped",
                  lambda d: rewrite(d / "rank1/seg1.pt2", (d / "rank1/seg0.pt2").read_bytes()))
    engine = Engine(lib, bad, verify=False)
    try:
        for _ in range(2):
            with pytest.raises(NativeError) as e:
                engine.generator(PROMPTS[:1], max_new_tokens=4)
            assert e.value.status == RUNTIME_ERROR
            assert e.value.message.startswith("rank 1: engine: rank1/seg1.pt2 failed"), e.value.message
            assert "\n" not in e.value.message
    finally:
        engine.close()


# -- the C programs, under AddressSanitizer -----------------------------------------------------


def asan_env(tmp_path: Path) -> dict:
    # LeakSanitizer's scan of thread-local storage can crash ("Tracer caught signal 11" on a bogus
    # DTLS range) once the loader has unloaded AOTI packages' shared libraries (valgrind sees no
    # invalid access in the same run), so TLS is not scanned (use_tls=0: LSan then reports more,
    # never fewer). glibc's dlopen bookkeeping is reachable only through TLS, hence its one
    # suppression; nothing of libcqil's or the programs' is suppressed.
    supp = tmp_path / "lsan.supp"
    supp.write_text("leak:_dl_map_object_deps\n")
    return {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23",
            "LSAN_OPTIONS": f"exitcode=23:use_tls=0:suppressions={supp}"}


def test_c_program_generates(native, aoti_engines):
    out = subprocess.run([str(native / "build" / "cqil-generate"), str(aoti_engines("p1")), "4", "5,6,7", "8,9"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split(":")[1].split() for line in out.stdout.splitlines()]
    assert [len(r) for r in rows] == [3 + 4, 2 + 4]


def test_c_api_under_asan_no_leak_no_invalid_access(native_asan, aoti_engines, tmp_path):
    """The C API test (every entry point, NULL handles, bad ids, long prompts, damaged engines) and the
    C example, instrumented with ASan + LSan, on the p=2 engine (two rank threads)."""
    bad = {name: rec for name, rec in bad_engines(aoti_engines("p2"), tmp_path).items() if not rec[1]}
    for program, args in (("cqil-c-api-test", [aoti_engines("p2"), *(d for d, _, _ in bad.values())]),
                          ("cqil-generate", [aoti_engines("p2"), 3, "5,6,7", "8,9"])):
        out = subprocess.run([str(native_asan / "build" / program), *map(str, args)], capture_output=True, text=True,
                             timeout=600, env=asan_env(tmp_path))
        assert "Sanitizer" not in out.stderr, out.stderr[-3000:]
        assert out.returncode == 0, (program, out.stdout[-2000:], out.stderr[-2000:])
        if program == "cqil-c-api-test":
            assert "ok: 0 failure(s)" in out.stdout
            messages = dict(line[len("bad: "):].split(": ", 1) for line in out.stdout.splitlines() if line.startswith("bad: "))
            for d, _, words in bad.values():
                assert words in messages[str(d)], (d, messages)


def test_build_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cqil.compiler.native", "-o", str(tmp_path / "n")], capture_output=True,
                         text=True, env={**os.environ, "PATH": str(tmp_path)})  # no cmake on this PATH
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "cmake not found" in out.stderr
