"""Where an engine directory is written, and how it replaces an older one without losing anything.

    dest = Destination(out_dir, model_dir, force)   # refuses what must not be replaced, sweeps leftovers
    tmp = dest.begin()                                # .OUT.tmp-PID-XXXX beside OUT, private to this compile
    ... write the engine into tmp ...
    dest.commit(tmp)                                  # OUT now holds the new engine, in one step

Guarantees:

- `--force` replaces only an empty folder or an engine directory (one holding a cqil manifest).
  An OUT that is the model folder, contains it or lies inside it is refused, as is a non-engine
  folder with files in it, and a file: nothing the user did not ask to delete is deleted.
- The swap is one step as readers see it: on Linux `renameat2(RENAME_EXCHANGE)` exchanges the
  finished folder with the old engine atomically, so OUT is always either the complete old engine or
  the complete new one. Where the kernel or file system cannot exchange (other systems), the old
  engine is renamed aside and the new one renamed in: a crash between the two renames leaves OUT
  missing and the old engine in `.OUT.old-PID-*`, which the next compile into OUT puts back.
- Leftovers of compiles that were killed (`.OUT.tmp-PID-*`, `.OUT.old-PID-*` of a process that is
  gone) are removed by the next compile into the same OUT; those of a compile still running are
  left alone. A read-only old engine is made writable before it is removed.
- A symlink OUT stays a symlink: the folder it points to is what gets replaced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from cqil.errors import CqilError
from cqil.exporters.manifest import MANIFEST

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


class Destination:
    def __init__(self, out_dir, model_dir, force: bool):
        given = Path(out_dir)
        self.out = Path(os.path.realpath(given))  # a symlink's target is replaced, the link stays
        model = Path(os.path.realpath(model_dir))
        for a, b, how in ((self.out, model, "is"), (self.out, model, "contains"), (model, self.out, "lies inside")):
            related = a == b if how == "is" else a in b.parents
            if related:
                raise CqilError(f"output {given} {how} the model folder {model_dir}; write the engine elsewhere")
        self.parent = self.out.parent
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CqilError(f"cannot create the folder of {given}: {e.strerror} ({e.filename})") from None
        self.sweep()
        if self.out.exists() and not self.out.is_dir():
            raise CqilError(f"output {given} exists and is not a directory")
        if self.out.is_dir():
            entries = sorted(p.name for p in self.out.iterdir())
            if entries and not force:
                raise CqilError(f"output {given} exists and is not empty; pass --force to replace it")
            if entries and not is_engine(self.out):
                shown = ", ".join(entries[:3]) + (" ..." if len(entries) > 3 else "")
                raise CqilError(f"output {given} holds files that are not a cqil engine ({shown}); --force only "
                                f"replaces an engine directory or an empty folder: choose another -o")

    def sweep(self):
        """Remove leftovers of earlier compiles into this OUT whose process is gone; put back an old
        engine that a crash between two renames left aside."""
        for p in self.parent.iterdir() if self.parent.is_dir() else ():
            m = _LEFTOVER.match(p.name)
            if not m or m["name"] != self.out.name or _alive(int(m["pid"])):
                continue
            if ".old-" in p.name and not self.out.exists() and is_engine(p):
                os.rename(p, self.out)
            else:
                remove_tree(p)

    def begin(self) -> Path:
        try:
            tmp = Path(tempfile.mkdtemp(dir=self.parent, prefix=f".{self.out.name}.tmp-{os.getpid()}-"))
        except OSError as e:
            raise CqilError(f"cannot write into {self.parent}: {e.strerror}") from None
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the engine should be like any other folder
        return tmp

    def commit(self, tmp: Path):
        """Put the finished engine `tmp` at OUT (see the module docstring); the old engine is removed."""
        if not self.out.exists() or _is_empty_dir(self.out):
            os.rename(tmp, self.out)  # onto nothing, or onto an empty folder: atomic
            return
        if _exchange(tmp, self.out):
            remove_tree(tmp)  # now the old engine
            return
        old = self.parent / f".{self.out.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
        os.rename(self.out, old)
        try:
            os.rename(tmp, self.out)
        except BaseException:
            if not self.out.exists():
                os.rename(old, self.out)
            raise
        remove_tree(old)

    def abort(self, tmp: Path):
        remove_tree(tmp)


def is_engine(folder: Path) -> bool:
    """A cqil engine directory: its manifest parses and starts with format_version."""
    import json

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


def remove_tree(path: Path):
    """rmtree that also removes read-only folders this process owns (an engine someone chmod'ed)."""
    def writable_then_retry(func, p, _exc):
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, stat.S_IRWXU)
        func(p)

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": writable_then_retry})


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
