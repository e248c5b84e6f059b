"""Engines compiled from the fixture give the recorded outputs (tests/fixtures/golden.json).

The record was written by `tools/golden.py write` from the code before the architecture rework;
files, tokens and logits must stay bit-identical on that toolchain and CPU (elsewhere: identical
tokens, logits within 1e-5). A change meant to alter outputs records anew and says why.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("golden_tool", ROOT / "tools" / "golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_outputs_equal_the_record(tmp_path):
    golden = _tool()
    recorded = json.loads(golden.RECORD.read_text())
    now = golden.record(tmp_path)
    assert set(now["plans"]) == set(recorded["plans"])
    assert golden.compare(recorded, now) == []


def test_compare_notices_a_change():
    golden = _tool()
    recorded = json.loads(golden.RECORD.read_text())
    changed = json.loads(json.dumps(recorded))
    plan = changed["plans"]["p2_d1"]
    plan["tokens"][0][-1] += 1
    plan["logits_sha256"] = "0" * 64
    problems = golden.compare(recorded, changed)
    assert problems == ["p2_d1: greedy tokens differ", "p2_d1: logits are not bit-identical (last position max |diff| 0.000e+00)"]
