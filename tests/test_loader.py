"""Reading checkpoints: config.json parsing, weight formats, partial loads, and refused inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cqil.model.config import ModelConfig
from cqil.model.loader import load_model
from cqil.errors import CqilError


def state_dict(folder):
    return load_file(str(folder / "model.safetensors"))


def edit_config(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (folder / "config.json").write_text(json.dumps(raw))


def assert_same_weights(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# -- weight formats ------------------------------------------------------------------------------

def write_sharded_safetensors(src, dst, hf_model):
    hf_model(src).save_pretrained(dst, max_shard_size="40KB")
    assert (dst / "model.safetensors.index.json").is_file() and not (dst / "model.safetensors").exists()


def write_bin(src, dst, hf_model):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    torch.save(state_dict(src), dst / "pytorch_model.bin")


def write_sharded_bin(src, dst, hf_model):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = sorted(state_dict(src).items())
    half = len(tensors) // 2
    weight_map = {}
    for i, part in enumerate((tensors[:half], tensors[half:])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save(dict(part), dst / file)
        weight_map.update({name: file for name, _ in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("preset", ["llama", "llama3"])
@pytest.mark.parametrize("write", [write_sharded_safetensors, write_bin, write_sharded_bin],
                         ids=["sharded-safetensors", "bin", "sharded-bin"])
def test_formats_load_the_same_model(write, preset, tiny_checkpoint, hf_model, tmp_path):
    src = tiny_checkpoint(preset, init_std=0.1)
    write(src, tmp_path / "ckpt", hf_model)
    model = load_model(tmp_path / "ckpt")
    assert_same_weights(model, load_model(src))
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        logits, _ = model(ids, torch.ones_like(ids), torch.arange(8)[None], model.empty_cache(1))
        assert (logits - hf_model(src)(input_ids=ids).logits).abs().max() <= 1e-5
    if preset == "llama3":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_some_layers_only(tiny_checkpoint):
    path = tiny_checkpoint("llama", init_std=0.1)
    full = load_model(path)
    part = load_model(path, layers=[1, 3])
    for l, layer in enumerate(part.model.layers):
        for name, param in layer.named_parameters():
            assert param.is_meta == (l not in (1, 3)), f"layer {l} {name}"
            if l in (1, 3):
                assert torch.equal(param, full.model.layers[l].get_parameter(name))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert not part.get_parameter(name).is_meta, name
    assert not part.rotary_emb.inv_freq.is_meta
    assert all(not p.is_meta for p in load_model(path, layers=range(6)).parameters())
    assert all(p.is_meta for l in load_model(path, layers=[]).model.layers for p in l.parameters())


def test_dtype(tiny_checkpoint):
    model = load_model(tiny_checkpoint("llama", init_std=0.1), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(CqilError, match="dtype 'int8' is not supported"):
        load_model(tiny_checkpoint("llama", init_std=0.1), dtype="int8")


# -- config.json -----------------------------------------------------------------------------------

def test_config_fields(tiny_checkpoint):
    llama3 = ModelConfig.from_dir(tiny_checkpoint("llama3", init_std=0.1))
    assert (llama3.architecture, llama3.head_dim, llama3.num_kv_heads, llama3.tie_word_embeddings) == \
        ("LlamaForCausalLM", 24, 1, True)
    assert llama3.rope_theta == 500000.0
    assert llama3.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    qwen2 = ModelConfig.from_dir(tiny_checkpoint("qwen2", init_std=0.1))
    assert (qwen2.architecture, qwen2.qkv_bias, qwen2.o_bias, qwen2.sliding_window) == \
        ("Qwen2ForCausalLM", True, False, None)
    mistral = ModelConfig.from_dir(tiny_checkpoint("mistral", init_std=0.1))
    assert (mistral.architecture, mistral.num_heads, mistral.num_kv_heads, mistral.sliding_window) == \
        ("MistralForCausalLM", 8, 2, None)


def test_legacy_rope_layout_reads_the_same(tiny_checkpoint):
    """transformers < 5 wrote rope_theta at the top level and rope_scaling with 'type' or 'rope_type'."""
    raw = json.loads((tiny_checkpoint("llama3", init_std=0.1) / "config.json").read_text())
    legacy = dict(raw)
    rope = dict(legacy.pop("rope_parameters"))
    legacy.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    assert ModelConfig.from_hf(raw).rope_type == "llama3"
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(raw)
    legacy["rope_scaling"]["type"] = legacy["rope_scaling"].pop("rope_type")
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(raw)


def test_authors_keys_are_kept(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint("llama") / "config.json").read_text())
    cfg = ModelConfig.from_hf({**raw, "cqil_layers": [[2, 3]], "d": 1})
    assert cfg.extra == {"cqil_layers": [[2, 3]], "d": 1}


def test_sliding_window(checkpoint_copy):
    path = checkpoint_copy("mistral")
    edit_config(path, sliding_window=32)  # max_position_embeddings is 256
    with pytest.raises(CqilError, match=r"sliding_window=32 .*256.*--max-seq-len 32"):
        load_model(path)
    model = load_model(path, max_seq_len=32)  # the window is never in effect
    assert not any(p.is_meta for p in model.parameters())


def test_qwen2_window_only_counts_when_used(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint("qwen2") / "config.json").read_text())
    assert ModelConfig.from_hf({**raw, "sliding_window": 32, "use_sliding_window": False}).sliding_window is None
    used = ModelConfig.from_hf({**raw, "sliding_window": 32, "use_sliding_window": True})
    with pytest.raises(CqilError, match="sliding_window=32"):
        used.check_sequence_length(256)


# -- refused checkpoints: one CqilError naming the problem ----------------------------------------

@pytest.mark.parametrize("changes, fragments", [
    (dict(architectures=["GPT2LMHeadModel"]), ["'GPT2LMHeadModel'", "LlamaForCausalLM"]),
    (dict(architectures=None, model_type="gemma"), ["'gemma'", "not supported"]),
    (dict(hidden_act="gelu"), ["hidden_act='gelu'"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), ["'yarn'", "llama3"]),
    (dict(rope_parameters=None, rope_scaling={"type": "longrope", "factor": 2.0}), ["'longrope'"]),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}),
     ["'llama3'", "'low_freq_factor'"]),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     ["partial_rotary_factor"]),
    (dict(num_key_value_heads=3), ["num_attention_heads=4", "num_key_value_heads=3"]),
    (dict(hidden_size=None), ["'hidden_size'"]),
    (dict(intermediate_size=100), ["model.layers.0.mlp.gate_proj.weight", "(160, 64)", "(100, 64)"]),
])
def test_bad_config(changes, fragments, checkpoint_copy):
    path = checkpoint_copy("llama")
    edit_config(path, **changes)
    with pytest.raises(CqilError) as info:
        load_model(path)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_or_unreadable_config(tmp_path):
    with pytest.raises(CqilError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CqilError, match="has no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CqilError, match="config.json is not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CqilError, match="must hold a JSON object"):
        load_model(tmp_path)
    with pytest.raises(CqilError, match="is not a directory"):
        load_model(tmp_path / "config.json")


def rewrite_weights(folder, edit):
    tensors = state_dict(folder)
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(checkpoint_copy):
    path = checkpoint_copy("llama")
    rewrite_weights(path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CqilError, match=r"missing tensor model\.layers\.2\.mlp\.up_proj\.weight"):
        load_model(path)


def test_shape_mismatch(checkpoint_copy):
    path = checkpoint_copy("llama")
    rewrite_weights(path, lambda t: t.update({"model.layers.4.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(CqilError) as info:
        load_model(path)
    assert str(info.value) == ("model: tensor model.layers.4.self_attn.k_proj.weight has shape (64, 64), "
                               "config.json implies (32, 64)")


def test_unexpected_tensor(checkpoint_copy):
    path = checkpoint_copy("llama")
    rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(CqilError, match=r"tensors this LlamaForCausalLM does not: model\.layers\.0\.self_attn\.q_norm"):
        load_model(path)


def test_no_weights_or_broken_files(checkpoint_copy, tiny_checkpoint, tmp_path):
    path = checkpoint_copy("llama")
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CqilError, match="cannot read .*model.safetensors"):
        load_model(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CqilError, match="holds no weights"):
        load_model(path)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CqilError, match="names model-00002-of-00002.safetensors, which is missing"):
        load_model(path)
