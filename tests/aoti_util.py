"""Shared by test_aoti.py and test_native.py: the fixture's AOTInductor engines and the native builds,
each made once per session, and ctypes bindings of libcqil's C API.

The slow parts (an AOTI compile of the fixture is 1-2 minutes per plan, a libcqil build about one)
run as subprocesses of the real command lines (`cqil-compile --formats onnx,aoti`,
`cqil-build-native [--asan]`), two at a time (CI has two cores and every other test runs in one
thread), all started when the first of them is needed; each fixture waits for its own only.
Every engine holds the ONNX segments too, so the Python ONNX Runtime engine and the AOTI runtimes
are compared on one engine directory.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "small-llama"
MAX_SEQ_LEN = 128
# plan name -> cqil-compile flags (fp16 weights compiled in float32: compared with ONNX at 1e-4)
PLANS = {"p2": ["--p", "2", "--bypass", "1"], "p4": ["--p", "4"], "p1": ["--p", "1"]}
BIN = Path(sys.executable).parent


class Jobs:
    """The session's slow subprocesses, two at a time, started together; `wait(name)` -> its folder.

    With CQIL_TEST_AOTI_DIR set (local iteration only), results already in that folder are reused
    and new ones are kept there."""

    def __init__(self, root: Path):
        self.root, self.times = root, {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopped = False
        pool = ThreadPoolExecutor(2, thread_name_prefix="aoti-job")
        self.futures: dict[str, Future] = {}
        commands = {name: [str(BIN / "cqil-compile"), str(FIXTURE), *PLANS[name], "--dtype", "float32", "--max-seq-len",
                           str(MAX_SEQ_LEN), "--formats", "onnx,aoti", "-o", str(root / name), "--no-progress"]
                    for name in PLANS}  # the longest first
        for name, extra in (("native", []), ("native-asan", ["--asan"])):
            commands[name] = [str(BIN / "cqil-build-native"), "-o", str(root / name), "--jobs", "1", *extra]
        for name, argv in commands.items():
            if any((root / name / f).is_file() for f in ("manifest.json", "libcqil.so")):
                self.futures[name] = Future()
                self.futures[name].set_result(root / name)
            else:
                self.futures[name] = pool.submit(self._run, name, argv)
        pool.shutdown(wait=False)

    def _run(self, name: str, argv: list[str]) -> Path:
        with self.lock:
            if self.stopped:
                raise RuntimeError("stopped")
            log = open(self.root / f"{name}.log", "w")
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        t0 = time.perf_counter()
        code = self.procs[name].wait()
        log.close()
        self.times[name] = time.perf_counter() - t0
        if code != 0:
            tail = (self.root / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(argv)} failed ({code}):\n{tail}")
        return self.root / name

    def wait(self, name: str) -> Path:
        return self.futures[name].result()

    def stop(self):
        with self.lock:
            self.stopped = True
            for p in self.procs.values():
                if p.poll() is None:
                    p.kill()


def _die_with_parent():
    """In a job's process: SIGTERM when the thread that started it (which waits for it) goes, so that a
    killed test run leaves no compile behind (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001  (not Linux)
        pass


_jobs: Jobs | None = None


def jobs(tmp_path_factory, request) -> Jobs:
    global _jobs
    if _jobs is None:
        reuse = os.environ.get("CQIL_TEST_AOTI_DIR")
        _jobs = Jobs(Path(reuse) if reuse else tmp_path_factory.mktemp("aoti"))
        request.session.config.add_cleanup(_stop_jobs)
    return _jobs


def _stop_jobs():
    global _jobs
    if _jobs is not None:
        _jobs.stop()
        times = ", ".join(f"{k} {v:.0f} s" for k, v in _jobs.times.items())
        print(f"\naoti jobs: {times}", file=sys.stderr)
        _jobs = None


@pytest.fixture(scope="session")
def aoti_engines(tmp_path_factory, request):
    """plan name -> a function giving that engine's folder (waiting for its compile)."""
    j = jobs(tmp_path_factory, request)
    return j.wait


@pytest.fixture(scope="session")
def native(tmp_path_factory, request) -> Path:
    """The folder cqil-build-native made: libcqil.so, include/, cqil-run-native, build/."""
    return jobs(tmp_path_factory, request).wait("native")


@pytest.fixture(scope="session")
def native_asan(tmp_path_factory, request) -> Path:
    return jobs(tmp_path_factory, request).wait("native-asan")


# -- the C API through ctypes -----------------------------------------------------------------


class Lib:
    """libcqil's C API, loaded into this process (it shares this process's libtorch)."""

    def __init__(self, path: Path):
        self.c = c = ctypes.CDLL(str(path))
        c.cqil_last_error.restype = ctypes.c_char_p
        c.cqil_version.restype = ctypes.c_char_p
        for name in ("cqil_engine_destroy", "cqil_generator_destroy", "cqil_params_destroy",
                     "cqil_engine_options_destroy"):
            getattr(c, name).restype = None

    def error(self) -> str:
        return self.c.cqil_last_error().decode()

    def call(self, name: str, *args) -> None:
        status = getattr(self.c, name)(*args)
        if status != 0:
            raise NativeError(status, self.error())


class NativeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"status {status}: {message}")
        self.status, self.message = status, message


def _rows(rows) -> tuple:
    flat = np.ascontiguousarray(np.concatenate([np.asarray(r, np.int64) for r in rows]) if rows else
                                np.zeros(0, np.int64))
    lengths = (ctypes.c_size_t * len(rows))(*[len(r) for r in rows])
    return flat, lengths


class Engine:
    def __init__(self, lib: Lib, path, threads: int = 1, verify: bool = True, devices: str | None = None):
        self.lib = lib
        opts = ctypes.c_void_p()
        lib.call("cqil_engine_options_create", ctypes.byref(opts))
        try:
            lib.call("cqil_engine_options_set_threads", opts, threads)
            lib.call("cqil_engine_options_set_verify", opts, int(verify))
            if devices is not None:
                lib.call("cqil_engine_options_set_devices", opts, devices.encode())
            handle = ctypes.c_void_p()
            lib.call("cqil_engine_create", str(path).encode(), opts, ctypes.byref(handle))
            self.handle = handle
        finally:
            lib.c.cqil_engine_options_destroy(opts)
        v = ctypes.c_int64()
        lib.call("cqil_engine_vocab_size", self.handle, ctypes.byref(v))
        self.vocab = v.value

    def close(self):
        if getattr(self, "handle", None) is not None:
            self.lib.c.cqil_engine_destroy(self.handle)
            self.handle = None

    __del__ = close  # the library keeps the engine while a generator of it lives

    def generator(self, rows, max_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0, seed=None, eos=()):
        return Generator(self, rows, max_new_tokens, temperature, top_k, top_p, seed, eos)


class Generator:
    def __init__(self, engine: Engine, rows, max_new_tokens, temperature, top_k, top_p, seed, eos):
        self.lib, self.vocab, self.batch = engine.lib, engine.vocab, len(rows)
        lib, params = self.lib, ctypes.c_void_p()
        lib.call("cqil_params_create", ctypes.byref(params))
        try:
            lib.call("cqil_params_set_max_new_tokens", params, ctypes.c_int64(max_new_tokens))
            lib.call("cqil_params_set_sampling", params, ctypes.c_double(temperature), ctypes.c_int64(top_k),
                     ctypes.c_double(top_p))
            if seed is not None:
                lib.call("cqil_params_set_seed", params, ctypes.c_uint64(seed))
            eos_ids = np.asarray(eos, np.int64)
            lib.call("cqil_params_set_eos", params, eos_ids.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(len(eos_ids)))
            flat, lengths = _rows(rows)
            handle = ctypes.c_void_p()
            lib.call("cqil_generator_create", engine.handle, params, flat.ctypes.data_as(ctypes.c_void_p), lengths,
                     ctypes.c_size_t(len(rows)), ctypes.byref(handle))
            self.handle = handle
        finally:
            lib.c.cqil_params_destroy(params)

    @property
    def done(self) -> bool:
        d = ctypes.c_int()
        self.lib.call("cqil_generator_done", self.handle, ctypes.byref(d))
        return bool(d.value)

    def next_tokens(self) -> np.ndarray:
        out = np.zeros(self.batch, np.int64)
        self.lib.call("cqil_generator_next_tokens", self.handle, out.ctypes.data_as(ctypes.c_void_p),
                      ctypes.c_size_t(self.batch))
        return out

    def append_tokens(self, rows):
        flat, lengths = _rows(rows)
        self.lib.call("cqil_generator_append_tokens", self.handle, flat.ctypes.data_as(ctypes.c_void_p), lengths,
                      ctypes.c_size_t(len(rows)))

    def rewind(self, n: int):
        self.lib.call("cqil_generator_rewind", self.handle, ctypes.c_size_t(n))

    @property
    def logits(self) -> np.ndarray:
        out = np.zeros((self.batch, self.vocab), np.float32)
        self.lib.call("cqil_generator_logits", self.handle, out.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(out.size))
        return out

    def tokens(self, row: int) -> list[int]:
        n = ctypes.c_size_t()
        self.lib.call("cqil_generator_tokens", self.handle, ctypes.c_size_t(row), None, ctypes.c_size_t(0), ctypes.byref(n))
        out = np.zeros(n.value, np.int64)
        self.lib.call("cqil_generator_tokens", self.handle, ctypes.c_size_t(row), out.ctypes.data_as(ctypes.c_void_p),
                      n, ctypes.byref(n))
        return out.tolist()

    def close(self):
        if getattr(self, "handle", None) is not None:
            self.lib.c.cqil_generator_destroy(self.handle)
            self.handle = None

    __del__ = close  # a generator left alive keeps its engine (and the packages' unpacked copies) alive


def engine_copy(src: Path, dst: Path) -> Path:
    """A copy of an engine whose files are hard links (fast, no space), except manifest.json; replace a
    file with `rewrite`, never write into it (that would change the original)."""
    shutil.copytree(src, dst, copy_function=os.link)
    rewrite(dst / "manifest.json", (src / "manifest.json").read_bytes())
    return dst


def rewrite(path: Path, data: bytes):
    path.unlink()
    path.write_bytes(data)


def run_native(native_dir: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(native_dir / "cqil-run-native"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
