"""p=1 (or an empty range) must reproduce `transformers` exactly: prefill, KV-cache decode, padding.

Every test runs the compiled GraphModule (`build_graph`), not just the eager `CausalLM`, on a tiny
random checkpoint written by transformers itself, and compares with transformers' own model.
"""

import inspect

import pytest
import torch

from cqil.model.loader import load_model
from cqil.passes import build_graph
from cqil.plan import Plan

PRESETS = ["llama", "llama3", "qwen2", "mistral"]
STD = 0.1  # wide init: logits far from uniform, so every layer moves them
ATOL = 1e-5
DECODE_STEPS = 16


def max_diff(a, b):
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def hf_step(hf, ids, cache=None):
    """transformers' forward with its own KV cache -> (logits, cache); `cache` was `past_key_values`."""
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(input_ids=ids, use_cache=True, **({kw: cache} if cache is not None else {}))
    return out.logits, out[kw]


def compiled(path, plan_for=lambda L: Plan(L, 1, 0, 0)):
    model = load_model(path)
    return model, build_graph(model, plan_for(model.config.num_layers))


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_and_decode_match_transformers(preset, tiny_checkpoint, hf_model):
    path = tiny_checkpoint(preset, init_std=STD)
    model, gm = compiled(path)
    hf = hf_model(path)
    cfg = model.config
    torch.manual_seed(1)
    B, T = 2, 7
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        ref, cache = hf_step(hf, ids)
        logits, past = gm(ids, torch.ones(B, T, dtype=torch.long), torch.arange(T).expand(B, T),
                          model.empty_cache(B))
        assert ref.abs().max() > 1.0  # logits far from uniform: the check below has teeth
        assert max_diff(logits, ref) <= ATOL, "prefill"
        assert len(past) == 2 * cfg.num_layers
        tokens = []
        for step in range(DECODE_STEPS):
            nxt = ref[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            tokens.append(nxt)
            length = T + step
            ref, cache = hf_step(hf, nxt, cache)
            logits, past = gm(nxt, torch.ones(B, length + 1, dtype=torch.long),
                              torch.full((B, 1), length), past)
            diff = max_diff(logits, ref)
            assert diff <= ATOL, f"decode step {step}: max abs diff {diff:.2e}"
        # The present tensors have the documented layout and equal transformers' cache.
        for layer in (0, cfg.num_layers - 1):
            key, value = past[2 * layer], past[2 * layer + 1]
            assert key.shape == (B, cfg.num_kv_heads, T + DECODE_STEPS, cfg.head_dim)
            assert max_diff(key, cache.layers[layer].keys) <= ATOL
            assert max_diff(value, cache.layers[layer].values) <= ATOL
    assert len(set(torch.cat(tokens, 1).flatten().tolist())) > 2  # decoding did not collapse


def test_llama3_rope_scaling_is_applied(tiny_checkpoint, hf_model):
    """The llama3 preset would pass the test above with plain rope only if scaling were inert."""
    from cqil.model.model import rope_inv_freq

    model = load_model(tiny_checkpoint("llama3", init_std=STD))
    assert model.config.rope_type == "llama3" and model.config.tie_word_embeddings
    plain = rope_inv_freq(type(model.config)(**{**model.config.to_dict(), "rope_scaling": {}}))
    scaled = model.rotary_emb.inv_freq
    assert (plain - scaled).abs().max() > 1e-3
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("plan_for", [
    lambda L: Plan(L, 2, 3, 3),   # empty range
    lambda L: Plan(L, 4, 0, 0),
    lambda L: Plan(L, 1, 1, 5),   # p=1 over a range: no groups either
], ids=["p2-empty", "p4-empty", "p1-range"])
def test_no_groups_is_the_original_model(plan_for, tiny_checkpoint, hf_model):
    path = tiny_checkpoint("llama", init_std=STD)
    model, gm = compiled(path, plan_for)
    assert not [n for n in gm.graph.nodes if "cqil.collective" in n.meta]
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        logits, past = gm(ids, torch.ones(1, 9, dtype=torch.long), torch.arange(9)[None],
                          model.empty_cache(1))
        assert max_diff(logits, hf_model(path)(input_ids=ids).logits) <= ATOL
        step, _ = gm(ids[:, :1], torch.ones(1, 10, dtype=torch.long), torch.tensor([[9]]), past)
        full = hf_model(path)(input_ids=torch.cat([ids, ids[:, :1]], 1)).logits[:, -1:]
        assert max_diff(step, full) <= ATOL


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch(preset, tiny_checkpoint, hf_model):
    """Non-pad positions of a left-padded batch equal per-sequence unpadded runs (prefill + decode)."""
    path = tiny_checkpoint(preset, init_std=STD)
    model, gm = compiled(path)
    hf = hf_model(path)
    torch.manual_seed(3)
    lengths = [7, 4, 2]
    B, T = len(lengths), max(lengths)
    seqs = [torch.randint(1, model.config.vocab_size, (n,)) for n in lengths]
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, past = gm(ids, mask, pos, model.empty_cache(B))
        for b, s in enumerate(seqs):
            ref = hf(input_ids=s[None]).logits[0]
            diff = max_diff(logits[b, T - len(s):], ref)
            assert diff <= ATOL, f"prefill, sequence {b}: max abs diff {diff:.2e}"
        for step in range(4):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            seqs = [torch.cat([s, nxt[b]]) for b, s in enumerate(seqs)]
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            logits, past = gm(nxt, mask, pos, past)
            for b, s in enumerate(seqs):
                ref = hf(input_ids=s[None]).logits[0, -1]  # full recompute, unpadded
                diff = max_diff(logits[b, -1], ref)
                assert diff <= ATOL, f"decode step {step}, sequence {b}: max abs diff {diff:.2e}"
