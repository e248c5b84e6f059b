"""Test and demo support: small random-weight checkpoints, made with transformers' own classes and `save_pretrained`.

Used by the tests, the benchmarks and the README's main job: nothing can be downloaded here, so the
project makes the checkpoints it compiles. Each preset exercises one family of config options.
"""

from __future__ import annotations

from pathlib import Path

PRESETS = {
    # GQA Llama
    "llama": dict(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    # Llama-3 style: llama3 rope scaling, tied embeddings, explicit head_dim
    "llama3": dict(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=24, max_position_embeddings=512,
                   tie_word_embeddings=True, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2 style: q/k/v bias
    "qwen2": dict(arch="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6),
    # Mistral: GQA, no window in effect
    "mistral": dict(arch="mistral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None),
    # the ~125M-parameter benchmark model (hidden 768, 12 layers, GQA 12/4, vocab 32000)
    "bench125m": dict(arch="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                      max_position_embeddings=2048),
}


def hf_config(preset: str = "llama", **overrides):
    """The transformers config object of a preset, with overrides applied."""
    import transformers

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    kw = {**PRESETS[preset], **overrides}
    arch = kw.pop("arch")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    return cls(**kw)


def random_checkpoint(out_dir: str | Path, preset: str = "llama", seed: int = 0, dtype: str = "float32",
                    init_std: float | None = None, **overrides) -> Path:
    """Write a random-weight checkpoint of `preset` to `out_dir` and return the folder.

    `init_std` widens the initialisation (default 0.02 makes logits nearly uniform, which hides
    errors in tests: a larger std makes greedy decoding sensitive to every layer).
    """
    import torch
    import transformers

    cfg = hf_config(preset, **overrides)
    if init_std is not None:
        cfg.initializer_range = init_std
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}[cfg.model_type]
    torch.manual_seed(seed)
    model = cls(cfg).to(getattr(torch, dtype)).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
