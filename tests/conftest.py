"""Shared fixtures: tiny random-weight checkpoints, made once per session.

Everything runs on CPU and nothing is downloaded. Checkpoints come from `cqil.testing` (transformers'
own classes + `save_pretrained`), so the folders look exactly like real HF checkpoints.

- `tiny_checkpoint(preset="llama", **kwargs)` -> Path: a cached, shared checkpoint folder. Treat it
  as read-only; `kwargs` go to `cqil.testing.random_checkpoint` (seed, dtype, init_std, config overrides).
- `checkpoint_copy(preset="llama", **kwargs)` -> Path: a private copy under the test's tmp_path,
  for tests that damage or rewrite a checkpoint.
- `hf_model(path)` -> the transformers model of a checkpoint folder (fp32, eval), cached.
- `config_dir(hf_config=None, **config_json)` -> Path: a folder holding only config.json.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from cqil.testing import random_checkpoint

# The test models are tiny: a second intra-op thread only adds spin-waiting, which on a shared
# 2-core machine makes each small matmul ~10x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_cqil_logger():
    """A command run in-process (main([...])) points the "cqil" logger at its own stderr handler and
    stops propagation; put it back so later tests' caplog (which listens at the root) sees records."""
    logger = logging.getLogger("cqil")
    state = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = state[0]
    logger.setLevel(state[1])
    logger.propagate = state[2]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    cache = {}

    def make(preset: str = "llama", **kwargs):
        key = (preset, json.dumps(kwargs, sort_keys=True, default=repr))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"ckpt-{preset}")
            cache[key] = random_checkpoint(folder, preset, **kwargs)
        return cache[key]

    return make


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    count = [0]

    def make(preset: str = "llama", **kwargs):
        count[0] += 1
        return shutil.copytree(tiny_checkpoint(preset, **kwargs), tmp_path / f"ckpt{count[0]}-{preset}")

    return make


@pytest.fixture(scope="session")
def hf_model():
    import transformers

    cache = {}

    def load(path):
        key = str(path)
        if key not in cache:
            cache[key] = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32).eval()
        return cache[key]

    return load


@pytest.fixture
def config_dir(tmp_path):
    """A folder with config.json only: from a transformers config object and/or raw keys."""
    count = [0]

    def make(hf_config=None, **config_json):
        count[0] += 1
        folder = tmp_path / f"config{count[0]}"
        folder.mkdir()
        raw = hf_config.to_dict() if hf_config is not None else {}
        raw.update(config_json)
        (folder / "config.json").write_text(json.dumps(raw))
        return folder

    return make
