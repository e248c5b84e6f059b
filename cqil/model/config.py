"""Model configuration read from a HuggingFace `config.json`, without importing transformers.

Supports `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM`. Both rope layouts are
read: transformers 5 (`rope_parameters` holding `rope_theta`) and older files (`rope_theta` plus
`rope_scaling`). Anything this project cannot run faithfully is refused here, with its name.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from cqil.errors import CqilError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings")
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value, name: str) -> int:
    """A JSON integer >= 1: "twelve", 12.7, true and -5 are refused, not converted."""
    if not _is_int(value) or value < 1:
        raise CqilError(f"model: {_HF_NAMES.get(name, name)} must be a positive integer, got {value!r}")
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CqilError(f"model: {name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # rope_type + its parameters; {} = default
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None  # only recorded when it could be in effect
    extra: dict = field(default_factory=dict)  # authors' CQIL keys, if any (cqil_layers, d)

    def __post_init__(self):
        for name in _POSITIVE_INTS:
            _positive_int(getattr(self, name), name)
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise CqilError(f"model: {name} must be a positive number, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CqilError(f"model: num_attention_heads={self.num_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_kv_heads}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if not all(i is None or (_is_int(i) and i >= 0) for i in ids):
                raise CqilError(f"model: {name} must be a token id (or a list of them), got {value!r}")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From `to_dict`'s output (an engine manifest's "model"): every field, nothing else."""
        if not isinstance(d, dict):
            raise CqilError(f"model: expected an object of config fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(set(d) - known), sorted(required - set(d))
        if unknown:
            raise CqilError(f"model: unknown config field(s) {', '.join(unknown)}")
        if missing:
            raise CqilError(f"model: config field(s) {', '.join(missing)} missing")
        return cls(**d)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir)
        if not path.exists():
            raise CqilError(f"model: {path} does not exist")
        if not path.is_dir():
            raise CqilError(f"model: {path} is not a directory (expected a HuggingFace checkpoint folder)")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CqilError(f"model: {path} has no config.json")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CqilError(f"model: {cfg_path} is not valid JSON ({e})")
        if not isinstance(raw, dict):
            raise CqilError(f"model: {cfg_path} must hold a JSON object")
        return cls.from_hf(raw)

    @classmethod
    def from_hf(cls, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}.get(raw.get("model_type"))
        if arch not in ARCHITECTURES:
            raise CqilError(
                f"model: architecture {arch or raw.get('model_type')!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CqilError(f"model: hidden_act={act!r} is not supported (only 'silu')")

        def need(key, default=MISSING):
            if key not in raw or raw[key] is None:
                if default is MISSING:
                    raise CqilError(f"model: config.json lacks {key!r}")
                return default
            return _positive_int(raw[key], key)

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = need("num_key_value_heads", heads)
        if raw.get("head_dim") is None and hidden % heads:
            raise CqilError(f"model: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                            f"(and config.json gives no head_dim)")
        head_dim = need("head_dim", hidden // heads)
        max_pos = need("max_position_embeddings", 2048)

        rope = dict(raw.get("rope_parameters") or {})
        if set(rope) and all(isinstance(v, dict) for v in rope.values()):
            raise CqilError("model: per-layer-type rope_parameters are not supported")
        legacy = raw.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        theta = _number(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)), "rope_theta")
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise CqilError(f"model: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise CqilError("model: partial_rotary_factor != 1 is not supported")
        rope.pop("partial_rotary_factor", None)
        required = {"linear": ["factor"], "dynamic": ["factor"],
                    "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}.get(rope_type, [])
        for key in required:
            if key not in rope:
                raise CqilError(f"model: rope type {rope_type!r} needs {key!r} in its parameters")
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", max_pos)
        scaling = {"rope_type": rope_type, **rope} if rope_type != "default" else {}

        qwen2 = arch == "Qwen2ForCausalLM"
        window = raw.get("sliding_window")
        if qwen2:
            layer_types = raw.get("layer_types") or []
            uses = raw.get("use_sliding_window", False) or "sliding_attention" in layer_types
            window = window if uses else None
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        extra = {k: raw[k] for k in ("cqil_layers", "d") if k in raw}
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=_number(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=bool(raw.get("attention_bias", False)) or qwen2,
            o_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            sliding_window=_positive_int(window, "sliding_window") if window else None,
            extra=extra,
        )

    def check_sequence_length(self, max_seq_len: int):
        """Refuse a sliding window that would be in effect for sequences up to `max_seq_len`."""
        if self.sliding_window is not None and self.sliding_window < max_seq_len:
            raise CqilError(
                f"model: sliding_window={self.sliding_window} would be in effect for sequences up to "
                f"{max_seq_len} tokens, and sliding-window attention is not supported; "
                f"compile with --max-seq-len {self.sliding_window} or less"
            )
