"""Model folders from the Hugging Face Hub: `MODEL` may be a hub id (`org/name`) as well as a folder.

    resolve_model("meta-llama/Llama-3.2-1B", revision="main", cache_dir=None) -> Path of the snapshot

A local folder always wins. Anything else that looks like a hub id is fetched with
`huggingface_hub.snapshot_download` into the usual cache (HF_HOME / HF_HUB_CACHE, or `cache_dir`),
only the files a compile reads: config.json, generation_config.json, the tokenizer files, and the
weights in one format (safetensors when the repository has them, else pytorch_model*.bin, with
their index). HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE work as everywhere in the HF ecosystem.

Offline (HF_HUB_OFFLINE=1) or with the Hub out of reach, the cached snapshot of that revision is
used; without one, the error is a single line: the id could not be fetched, why, whether a cached
copy exists, and that a local folder works.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from cqil.errors import CqilError, first_line
from cqil.model.tokenizer import TOKENIZER_FILES

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ALWAYS = ["config.json", *TOKENIZER_FILES]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
PYTORCH = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def is_hub_id(model) -> bool:
    return isinstance(model, str) and bool(HUB_ID.match(model)) and ".." not in model


def resolve_model(model, revision: str | None = None, cache_dir=None) -> Path:
    """A local checkpoint folder: `model` itself when it exists (or is no hub id), else its hub snapshot."""
    path = Path(model)
    if path.exists() or not is_hub_id(str(model)):
        if revision is not None:
            raise CqilError(f"--revision {revision} is for hub ids; {model} is a local folder")
        return path
    return _download(str(model), revision, cache_dir)


def _download(repo_id: str, revision, cache_dir) -> Path:
    import huggingface_hub

    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception as e:  # offline, unreachable, unknown id, gated: the cache may still have it
        return _cached(repo_id, revision, cache_dir, e)
    weights = SAFETENSORS if any(fnmatch.fnmatch(f, "*.safetensors") for f in files) else PYTORCH
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                   allow_patterns=ALWAYS + weights)
    except Exception as e:
        raise CqilError(f"cannot fetch {repo_id} from the Hugging Face Hub: {type(e).__name__}: {first_line(e)}; "
                        f"a local checkpoint folder works too") from None
    return Path(folder)


def _cached(repo_id: str, revision, cache_dir, cause: Exception) -> Path:
    """The cached snapshot of `revision`, or the one-line error saying why there is none."""
    import huggingface_hub
    from huggingface_hub import constants

    where = Path(cache_dir or constants.HF_HUB_CACHE)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                        local_files_only=True, allow_patterns=["config.json"]))
    except Exception:
        folder = None
    if folder is not None and (folder / "config.json").is_file():
        return folder
    offline = constants.HF_HUB_OFFLINE
    why = "offline mode (HF_HUB_OFFLINE)" if offline else f"{type(cause).__name__}: {first_line(cause)}"
    repo_dir = where / f"models--{repo_id.replace('/', '--')}"
    cached = ("a cached copy exists but not of revision " + (revision or "main")) if repo_dir.is_dir() \
        else f"no cached copy in {where}"
    raise CqilError(f"cannot fetch {repo_id} from the Hugging Face Hub ({why}); {cached}; "
                    f"no local folder {repo_id} either: pass a local checkpoint folder, or fetch it where the Hub "
                    f"is reachable")
