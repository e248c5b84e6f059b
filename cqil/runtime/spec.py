"""What the runtime reads from an engine directory: the manifest, as typed values.

    spec = EngineSpec.read("engine_dir")          # checks format version, structure, files
    spec.plan, spec.config, spec.max_seq_len, spec.programs[rank], spec.segments(rank)

Backends open their ranks from a spec; the Engine, the torchrun launcher and the verification
tools read it too. Nothing here is derived anew from the plan: per-rank facts (KV layers, tensor
shapes, programs) are the manifest's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cqil.errors import CqilError
from cqil.exporters.manifest import read_manifest
from cqil.model.config import ModelConfig
from cqil.plan import Plan
from cqil.program import MODEL_INPUTS, Step, cache_entries, past_name

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


@dataclass(frozen=True)
class EngineSpec:
    dir: Path
    manifest: dict
    config: ModelConfig
    plan: Plan
    dtype: str  # "float32", "float16", "bfloat16"
    max_seq_len: int
    programs: dict[int, list[Step]]

    @classmethod
    def read(cls, engine_dir, verify: bool = True) -> "EngineSpec":
        root = Path(engine_dir)
        manifest = read_manifest(root, verify=verify)
        programs = {r["rank"]: [Step.from_dict(s) for s in r["program"]] for r in manifest["ranks"]}
        return cls(root, manifest, ModelConfig.from_dict(manifest["model"]), Plan.from_dict(manifest["plan"]),
                   manifest["dtype"], int(manifest["max_seq_len"]), programs)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.programs)

    def rank_record(self, rank: int) -> dict:
        return next(r for r in self.manifest["ranks"] if r["rank"] == rank)

    def segments(self, rank: int) -> list[dict]:
        """The manifest's segment records of `rank`, in program order."""
        return self.rank_record(rank)["segments"]

    def kv_layers(self, rank: int) -> list[int]:
        return list(self.rank_record(rank)["kv_layers"])

    def tensor(self, rank: int, name: str) -> dict:
        """The record {name, dtype, shape} of a tensor some segment of `rank` takes as input."""
        for seg in self.segments(rank):
            for t in seg["inputs"]:
                if t["name"] == name:
                    return t
        raise CqilError(f"engine: rank {rank} has no input tensor {name!r}")

    @property
    def float_dtype(self):
        """numpy dtype of activations and KV cache (bfloat16 engines hand float32 to numpy)."""
        return NUMPY_DTYPES.get(self.dtype, np.float32)

    def rank_inputs(self, rank: int) -> set[str]:
        """Names a rank has before its first step: model inputs and its past keys/values."""
        return set(MODEL_INPUTS) | {past_name(layer, kind) for layer, kind in cache_entries(self.kv_layers(rank))}
