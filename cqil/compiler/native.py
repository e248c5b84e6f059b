"""`cqil-build-native -o DIR [--asan] [--jobs N]`: build libcqil, the C/C++ runtime (cqil/native).

    cqil-build-native -o native        # -> native/libcqil.so, native/include/cqil.h, cqil.hpp, native/cqil-run-native

CMake configures and builds the project shipped inside the cqil package (`cqil/native`, package
data, so that an installed cqil has it too) in DIR/build, against the libtorch of the installed
torch wheel (`torch.utils.cmake_prefix_path`) and the nlohmann/json headers of the `nlohmann-json`
package; Ninja when it is installed, else Make. The C example and the C API test stay in DIR/build
(`cqil-generate`, `cqil-c-api-test`). `--asan` builds everything with AddressSanitizer (and
LeakSanitizer), for the CI check. The build's output goes to DIR/build/build.log; a failure is one
line naming it. Rebuilding into the same DIR is incremental.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cqil.cli_util import ArgumentParser, add_logging_flags, configure_logging, run_main
from cqil.errors import CqilError

SOURCE = Path(__file__).resolve().parents[1] / "native"
OUTPUTS = ("libcqil.so", "cqil-run-native")
HEADERS = ("cqil.h", "cqil.hpp")
log = logging.getLogger("cqil")


def _tool(names: tuple[str, ...], what: str, install: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise CqilError(f"{what} not found ({' or '.join(names)} on PATH): {install}")


def _json_include() -> str | None:
    """The nlohmann-json package's include folder, found without importing it (its import needs more)."""
    import importlib.util

    spec = importlib.util.find_spec("nlohmann_json")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "include")


def _run(cmd: list[str], logfile: Path, step: str) -> float:
    t0 = time.perf_counter()
    with open(logfile, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        lines = logfile.read_text(errors="replace").splitlines()
        first = next((ln.strip() for ln in lines if "error" in ln.lower() and not ln.startswith("$")), None)
        raise CqilError(f"the native {step} failed ({first or f'exit status {code}'}); see {logfile}")
    return time.perf_counter() - t0


def _fresh_build_dir(build: Path):
    """Start over when DIR/build was configured from another source folder (another cqil install)."""
    cache = build / "CMakeCache.txt"
    if cache.is_file():
        home = next((ln.split("=", 1)[1] for ln in cache.read_text(errors="replace").splitlines()
                     if ln.startswith("CMAKE_HOME_DIRECTORY:")), None)
        if home is not None and Path(home).resolve() != SOURCE:
            shutil.rmtree(build)
    build.mkdir(parents=True, exist_ok=True)


def build_native(out_dir, asan: bool = False, jobs: int | None = None) -> dict:
    """Configure and build libcqil into out_dir/build and copy the results to out_dir; returns the
    paths and timings."""
    import torch

    if not (SOURCE / "CMakeLists.txt").is_file():
        raise CqilError(f"the native sources are missing from {SOURCE} (a cqil install without its package data?)")
    cmake = _tool(("cmake",), "cmake", "apt install cmake, or pip install cmake")
    cxx = os.environ.get("CXX")
    if cxx is None:
        _tool(("c++", "g++", "clang++"), "a C++ compiler", "apt install g++")
    elif not shutil.which(cxx):
        raise CqilError(f"CXX={cxx} is not an executable on PATH")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CqilError(f"-o {out} is a file, not a folder")
    build = out / "build"
    _fresh_build_dir(build)
    logfile = build / "build.log"
    logfile.write_text("")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else ["-G", "Unix Makefiles"]
    configure = [cmake, "-S", str(SOURCE), "-B", str(build), *generator,
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}",
                 f"-DCQIL_ASAN={'ON' if asan else 'OFF'}", "-DCMAKE_BUILD_TYPE=" + ("RelWithDebInfo" if asan else "Release")]
    include = _json_include()
    if include is not None:
        configure.append(f"-DNLOHMANN_JSON_INCLUDE_DIR={include}")
    t_configure = _run(configure, logfile, "configure")
    jobs = jobs or os.cpu_count() or 1
    t_build = _run([cmake, "--build", str(build), "--parallel", str(jobs)], logfile, "build")
    for name in OUTPUTS:
        shutil.copy2(build / name, out / name)
    (out / "include").mkdir(exist_ok=True)
    for name in HEADERS:
        shutil.copy2(SOURCE / "include" / name, out / "include" / name)
    return {"dir": out, "library": out / "libcqil.so", "run": out / "cqil-run-native", "build": build,
            "configure_s": round(t_configure, 1), "build_s": round(t_build, 1)}


def main(argv=None) -> int:
    parser = ArgumentParser(prog="cqil-build-native", description="Build libcqil, the C/C++ runtime of cqil engines "
                            "(docs/cpp.md), against the installed torch.")
    parser.add_argument("-o", "--output", required=True, help="folder for libcqil.so, include/ and cqil-run-native")
    parser.add_argument("--asan", action="store_true", help="build with AddressSanitizer (for leak and memory checks)")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    configure_logging(args, "cqil-build-native")
    if args.jobs is not None and args.jobs < 1:
        raise CqilError(f"--jobs must be >= 1, got {args.jobs}")
    result = build_native(args.output, asan=args.asan, jobs=args.jobs)
    log.info(f"built {result['library']} ({'ASan, ' if args.asan else ''}configure {result['configure_s']} s, "
             f"build {result['build_s']} s); headers in {result['dir'] / 'include'}, example {result['run']}")
    return 0


def entry():
    sys.exit(run_main("cqil-build-native", main))


if __name__ == "__main__":
    entry()
