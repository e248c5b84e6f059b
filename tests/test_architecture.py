"""The layering of docs/architecture.md holds: import-linter's contracts (pyproject.toml) are kept."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or pytest.fail("lint-imports is missing: pip install -e '.[test]'")
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_every_package_is_in_a_layer():
    """A new top-level module or package must be placed in the layers contract, or it is unchecked."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["type"] == "layers")["layers"]
    placed = {m.strip() for layer in layers for m in layer.replace(":", "|").split("|")}
    found = {f"cqil.{p.stem}" for p in (ROOT / "cqil").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert found == placed, f"not in a layer: {sorted(found - placed)}; no longer present: {sorted(placed - found)}"
