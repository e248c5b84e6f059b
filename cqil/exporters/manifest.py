"""The engine directory's manifest: write it, read it back, verify the files it names.

Layout (in the spirit of TensorRT-LLM's `config.json` + `rank{N}.engine`)::

    engine_dir/
      manifest.json            this schema, `format_version` first
      rank0/seg0.onnx ...      one folder per rank; large segments keep weights in seg*.onnx.data
      tokenizer.json ...       copied from the checkpoint when it has them

manifest.json::

    format_version   int, FORMAT_VERSION; readers refuse a newer one
    toolchain        versions of cqil, torch, onnx, onnxruntime, transformers; the ONNX opset
    model            ModelConfig.to_dict()
    plan             Plan.to_dict()
    dtype, max_seq_len
    ranks            [{rank, layers, kv_layers, program: [Step.to_dict()],
                       segments: [{name, file, inputs: [tensor], outputs: [tensor], layers, weight_bytes}]}]
                     tensor = {name, dtype, shape}; shape entries are ints or the dynamic axis names
                     "batch", "sequence", "past_sequence", "total_sequence"
    tokenizer_files  [file names]
    files            {relative path: {sha256, bytes}} for every file above
    source           {model_dir, adapter}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cqil.errors import CqilError
from cqil.exporters.schema import check_manifest

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def is_engine_dir(path: str | Path) -> bool:
    """Whether `path` is an engine directory (it holds a manifest), without reading it."""
    return (Path(path) / MANIFEST).is_file()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(root: Path, relpaths) -> dict:
    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in sorted(relpaths)}


def write_manifest(root: Path, manifest: dict):
    if next(iter(manifest)) != "format_version":
        raise ValueError("format_version must be the manifest's first key")
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(engine_dir: str | Path, verify: bool = True) -> dict:
    """Parse and check an engine directory's manifest (`cqil.exporters.schema`).

    verify=True also checks that every listed file exists with the recorded size and sha256.
    """
    root = Path(engine_dir)
    if not root.is_dir():
        raise CqilError(f"engine: {root} is not a directory")
    path = root / MANIFEST
    if not path.is_file():
        raise CqilError(f"engine: {root} has no {MANIFEST} (not an engine directory?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CqilError(f"engine: {path} is not valid JSON ({e})")
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise CqilError(f"engine: {path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise CqilError(f"engine: {root} has format_version {version}, newer than this cqil reads "
                        f"({FORMAT_VERSION}); upgrade cqil or recompile the engine")
    check_manifest(manifest, path)
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: dict):
    unlisted = sorted({f for rank in manifest["ranks"] for seg in rank["segments"] for f in seg["files"]}
                      - set(manifest["files"]))
    if unlisted:
        raise CqilError(f"engine: {unlisted[0]} has no checksum in the manifest's files (hand-edited manifest?)")
    for rel, rec in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise CqilError(f"engine: {rel} is missing from {root}")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise CqilError(f"engine: {rel} has {size} bytes, the manifest records {rec['bytes']} (truncated or replaced?)")
        if sha256_file(path) != rec["sha256"]:
            raise CqilError(f"engine: {rel} does not match its sha256 in the manifest (corrupted or modified)")
