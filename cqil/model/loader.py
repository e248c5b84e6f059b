"""Load a local HuggingFace checkpoint into `CausalLM`, lazily and layer by layer.

The model is built on the meta device; each tensor is then read on its own from safetensors (which
maps the file) or from a `pytorch_model.bin` opened with `mmap=True`, converted, checked against the
expected shape and assigned. No step holds the whole model twice, and `layers=` loads only some
decoder layers (the rest stay on meta), which is how one rank avoids the other ranks' weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from cqil.errors import CqilError, first_line
from cqil.model.config import ModelConfig
from cqil.model.model import CausalLM, RotaryEmbedding, rope_inv_freq

_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def stored_name(name: str, tied: bool) -> str:
    """The name a parameter is stored (and read) under: a tied lm_head is the embedding, as in HF checkpoints."""
    return EMBED if tied and name == LM_HEAD else name


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CqilError(f"dtype {name!r} is not supported (use float32, float16 or bfloat16)")
    return DTYPES[name]


class Checkpoint:
    """Name -> tensor access over the files of a checkpoint folder, opening each file once."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._open: dict[str, object] = {}
        self._keys: dict[str, set[str]] = {}  # tensor names per file
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (self.dir / index).is_file():
                try:
                    weight_map = json.loads((self.dir / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CqilError(f"model: {self.dir / index} is not a valid index ({e})")
                for file in sorted(set(weight_map.values())):
                    if not (self.dir / file).is_file():
                        raise CqilError(f"model: {self.dir / index} names {file}, which is missing")
                return weight_map
            if (self.dir / single).is_file():
                return {name: single for name in self._names_in(single)}
        raise CqilError(f"model: {self.dir} holds no weights (model.safetensors, its index, or pytorch_model.bin)")

    def _file(self, file: str):
        if file not in self._open:
            path = self.dir / file
            try:
                if file.endswith(".safetensors"):
                    from safetensors import safe_open
                    self._open[file] = safe_open(str(path), framework="pt", device="cpu")
                else:
                    self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # corrupt or truncated files raise many different types
                raise CqilError(f"model: cannot read {path}: {first_line(e)}") from None
        return self._open[file]

    def _names_in(self, file: str) -> list[str]:
        f = self._file(file)
        return list(f.keys())

    def names(self) -> list[str]:
        return list(self.weight_map)

    def close(self):
        """Forget the open files. Tensors read from safetensors (and mmap-ed .bin files) are views of
        the file's mapping, and while it stays mapped every page read so far counts toward RSS:
        streaming a 13 GB checkpoint would look like holding it. Files reopen on the next read."""
        self._open.clear()

    def file_bytes(self) -> int:
        """Size of the checkpoint's weight files on disk."""
        return sum((self.dir / f).stat().st_size for f in set(self.weight_map.values()))

    def _holding(self, name: str):
        """The open file that holds `name`, checked: an index may map a tensor to the wrong shard."""
        file = self.weight_map[name]
        f = self._file(file)
        if file not in self._keys:
            self._keys[file] = set(f.keys())
        if name not in self._keys[file]:
            raise CqilError(f"model: the checkpoint's index maps {name} to {file}, which does not hold it")
        return f

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._holding(name)
        return tuple(f.get_slice(name).get_shape()) if hasattr(f, "get_slice") else tuple(f[name].shape)

    def get(self, name: str) -> torch.Tensor:
        f = self._holding(name)
        try:
            return f.get_tensor(name) if hasattr(f, "get_tensor") else f[name]
        except Exception as e:
            raise CqilError(f"model: cannot read tensor {name} from {self.dir / self.weight_map[name]}: "
                            f"{first_line(e)}") from None


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def build_meta_model(cfg: ModelConfig, max_seq_len: int | None = None, dtype="float32") -> CausalLM:
    """The model with every weight on the meta device (no memory), rope frequencies real."""
    with torch.device("meta"):
        model = CausalLM(cfg, max_seq_len)
    model.rotary_emb = RotaryEmbedding(rope_inv_freq(cfg, max_seq_len))
    dtype = parse_dtype(dtype)
    if dtype != torch.float32:
        for name, p in list(model.named_parameters()):
            _assign(model, name, p.to(dtype))
        _tie(model)
    return model


class Weights:
    """Checked access to a checkpoint's weights for one model: materialize and release by name."""

    def __init__(self, model_dir: str | Path, model: CausalLM, dtype="float32"):
        self.ckpt = Checkpoint(model_dir)
        self.model = model
        self.dtype = parse_dtype(dtype)
        self.tied = model.config.tie_word_embeddings
        self._check()

    def _source(self, name: str) -> str:
        return stored_name(name, self.tied)

    def _check(self):
        """Names and shapes, from metadata only (no tensor is read)."""
        expected = dict(self.model.named_parameters(remove_duplicate=False))
        available = set(self.ckpt.names())
        unexpected = sorted(n for n in available - set(expected) if not _IGNORED.search(n))
        if unexpected:
            more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
            raise CqilError(f"model: checkpoint has tensors this {self.model.config.architecture} does not: "
                            f"{', '.join(unexpected[:3])}{more}")
        for name, param in expected.items():
            source = self._source(name)
            if source not in available:
                raise CqilError(f"model: checkpoint {self.ckpt.dir} is missing tensor {source}")
            shape = self.ckpt.shape(source)
            if shape != tuple(param.shape):
                raise CqilError(f"model: tensor {source} has shape {shape}, config.json implies {tuple(param.shape)}")

    def _owners(self, names) -> list[str]:
        """Tied lm_head has no weight of its own: it is loaded and released as the embedding."""
        return list(dict.fromkeys(self._source(n) for n in names))

    def materialize(self, names):
        for name in self._owners(names):
            _assign(self.model, name, self.ckpt.get(name).to(self.dtype))
        _tie(self.model)

    def release(self, names):
        for name in self._owners(names):
            p = self.model.get_parameter(name)
            _assign(self.model, name, torch.empty_like(p, device="meta"))
        _tie(self.model)
        self.ckpt.close()  # unmapped once the last tensor read from a file is gone


def param_names(module: nn.Module, layers=None) -> list[str]:
    """Parameter names of `module`, restricted to decoder `layers` (non-layer weights always)."""
    wanted = None if layers is None else set(layers)
    return [n for n, _ in module.named_parameters(remove_duplicate=False)
            if wanted is None or layer_of(n) is None or layer_of(n) in wanted]


def load_model(model_dir: str | Path, dtype="float32", layers=None, max_seq_len: int | None = None,
               cfg: ModelConfig | None = None, adapter: str | Path | None = None, plan=None,
               allow_plan_mismatch: bool = False) -> CausalLM:
    """Load a checkpoint folder. `layers`: decoder layers to load (default all); others stay on meta.

    Embedding, final norm and lm_head are always loaded. With `adapter` (a cqil-finetune LoRA
    folder) the weights are loaded in float32, the adapter is checked against `plan` (see
    `cqil.model.adapter`) and merged, and the result is cast to `dtype`; rope frequencies stay fp32.
    """
    cfg = cfg or ModelConfig.from_dir(model_dir)
    cfg.check_sequence_length(max_seq_len or cfg.max_position_embeddings)
    dtype = parse_dtype(dtype)
    if adapter is not None and plan is None:
        raise CqilError("model: merging an adapter needs the plan it is used with")
    load_dtype = torch.float32 if adapter is not None else dtype  # LoRA merges in float32
    model = build_meta_model(cfg, max_seq_len, load_dtype)
    Weights(model_dir, model, load_dtype).materialize(param_names(model, layers))
    if adapter is not None:
        from cqil.model.adapter import merge_adapter

        model = merge_adapter(model, adapter, plan, allow_plan_mismatch=allow_plan_mismatch)
        if dtype != torch.float32:
            model = model.to(dtype)
            model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.float()
    model.eval()
    return model


def _tie(model: CausalLM):
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def _assign(model: nn.Module, name: str, tensor: torch.Tensor):
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
