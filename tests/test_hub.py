"""Hub ids as MODEL (cqil.model.hub): a pre-filled local cache read offline, the one-line error for an
id that is neither cached nor a folder, and which files an online download would ask for. Nothing
is downloaded: no hub is reachable from these machines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
from huggingface_hub import constants

import cqil
from cqil.errors import CqilError
from cqil.model import hub
from engine_util import STD

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache, repo_id: str, checkpoint, revision: str = "main"):
    """The layout huggingface_hub writes: refs/<revision> holds the commit, snapshots/<commit>/ the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(COMMIT)
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def cache(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-cache")
    fill_cache(root, "cqil-test/tiny-llama", tiny_checkpoint("llama", init_std=STD, num_hidden_layers=2))
    return root


def test_hub_id_loads_from_the_cache_offline(cache, offline, tmp_path):
    folder = hub.resolve_model("cqil-test/tiny-llama", cache_dir=cache)
    assert folder == cache / "models--cqil-test--tiny-llama" / "snapshots" / COMMIT
    out = cqil.compile("cqil-test/tiny-llama", tmp_path / "engine", p=1, cache_dir=cache, max_seq_len=32,
                       progress=False, log=lambda m: None)
    with cqil.load(out, threads=1) as engine:
        assert len(engine.generate([[1, 2, 3]], max_new_tokens=4)[0]) == 7


def test_missing_id_offline_is_one_line(cache, offline):
    with pytest.raises(CqilError) as err:
        hub.resolve_model("cqil-test/not-there", cache_dir=cache)
    message = str(err.value)
    assert "\n" not in message
    for words in ("cannot fetch cqil-test/not-there", "offline mode (HF_HUB_OFFLINE)", f"no cached copy in {cache}",
                  "local checkpoint folder"):
        assert words in message
    with pytest.raises(CqilError, match="a cached copy exists but not of revision v2"):
        hub.resolve_model("cqil-test/tiny-llama", revision="v2", cache_dir=cache)


def test_local_folders_win_and_take_no_revision(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama", init_std=STD, num_hidden_layers=2)
    assert hub.resolve_model(str(ckpt)) == ckpt
    assert hub.resolve_model("no/such/folder") == hub.Path("no/such/folder")  # not an id: the loader says why
    with pytest.raises(CqilError, match="--revision v1 is for hub ids"):
        hub.resolve_model(str(ckpt), revision="v1")
    assert not hub.is_hub_id("../x") and not hub.is_hub_id("/abs/path") and hub.is_hub_id("org/name-1.5B")


@pytest.mark.parametrize("files, weights", [
    (["config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin", "README.md"], hub.SAFETENSORS),
    (["config.json", "pytorch_model.bin", "tokenizer.json"], hub.PYTORCH),
])
def test_online_download_asks_only_for_needed_files(monkeypatch, tmp_path, files, weights):
    asked = {}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: files)

    def snapshot_download(repo_id, **kw):
        asked.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.resolve_model("org/model", revision="v1", cache_dir=tmp_path / "c") == tmp_path
    assert asked["repo_id"] == "org/model" and asked["revision"] == "v1" and asked["cache_dir"] == tmp_path / "c"
    assert set(asked["allow_patterns"]) == set(hub.ALWAYS) | set(weights)
    assert "generation_config.json" in hub.ALWAYS and "tokenizer.json" in hub.ALWAYS


def test_cqil_compile_with_hub_environment_variables(cache):
    """cqil-compile's own code path with HF_HUB_OFFLINE / HF_HUB_CACHE set before huggingface_hub is
    imported (one fresh process, two command lines): the cached id works, a missing one is one line, exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "CQIL_DEBUG": ""}
    code = """if True:
        import sys
        from cqil.cli_util import run_main
        from cqil.compiler.cli import main
        for model in ("cqil-test/tiny-llama", "cqil-test/missing"):
            code = run_main("cqil-compile", main, [model, "--p", "1", "--dry-run", "--json", "--quiet"])
            print("exit", code, flush=True)
            print("--", file=sys.stderr, flush=True)
    """
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    out, errors = run.stdout.splitlines(), run.stderr.split("--\n")
    assert out[1:] == ["exit 0", "exit 2"] and '"num_layers": 2' in out[0], run.stdout + run.stderr
    assert errors[0] == ""  # --quiet
    assert len(errors[1].strip().splitlines()) == 1, errors[1]
    assert errors[1].startswith("cqil-compile: error: cannot fetch cqil-test/missing from the Hugging Face Hub "
                                "(offline mode (HF_HUB_OFFLINE)); no cached copy in ")
