"""The CQIL pass against a direct implementation of the formulas of DESIGN.md section 1.

`cqil_reference` below is written from the formulas, not from the pass: it calls the model's own
submodules (norms, attention, MLP, embedding, lm_head) in plain Python. The rotary tables and the
additive mask come from the project (`rotary_emb`, `causal_mask`); test_model_equivalence checks
those against transformers.
"""

import time

import pytest
import torch

from cqil.model.config import ModelConfig
from cqil.model.loader import build_meta_model, load_model
from cqil.model.model import causal_mask
from cqil.passes import build_graph
from cqil.model.trace import trace
from cqil.errors import CqilError
from cqil.passes.collectives import all_gather, all_reduce_sum, collective_kind
from cqil.passes.group_layers import group_layers
from cqil.plan import Plan

STD = 0.1
ATOL = 1e-5
LAYERS = 10  # room for a prefix, two or more groups and a suffix at every p


def cqil_reference(model, plan, input_ids, attention_mask, position_ids, past):
    """logits, presents of the CQIL model, straight from the formulas.

        A_i = Attn_{g_i}(RMSNorm_in_{g_i}(x));   B_i = sum_{k=1..min(d,i)} A_{i-k}
        h_i = x + A_i + B_i;                     F_i = MLP_{g_i}(RMSNorm_post_{g_i}(h_i))
        out = x + sum_i (A_i + F_i)              "once"
        out = x + sum_i (A_i + B_i + F_i)        "reference"
    """
    layers = model.model.layers
    x = model.model.embed_tokens(input_ids)
    cos, sin = model.rotary_emb(position_ids)
    mask = causal_mask(attention_mask, position_ids, x.dtype)
    presents = [None] * (2 * len(layers))

    def attn(l, x):
        out, presents[2 * l], presents[2 * l + 1] = layers[l].self_attn(
            layers[l].input_layernorm(x), cos, sin, mask, past[2 * l], past[2 * l + 1])
        return out

    def mlp(l, h):
        return layers[l].mlp(layers[l].post_attention_layernorm(h))

    d, l = plan.bypass, 0
    group_at = {g[0]: g for g in plan.groups}
    while l < len(layers):
        if l not in group_at:  # an ordinary layer
            h = x + attn(l, x)
            x = h + mlp(l, h)
            l += 1
            continue
        g = group_at[l]
        A = [attn(m, x) for m in g]
        B = [sum((A[i - k] for k in range(1, min(d, i) + 1)), torch.zeros_like(x)) for i in range(len(g))]
        F = [mlp(m, x + A[i] + B[i]) for i, m in enumerate(g)]
        if plan.semantics == "once":
            x = x + sum(A[i] + F[i] for i in range(len(g)))
        else:
            x = x + sum(A[i] + B[i] + F[i] for i in range(len(g)))
        l += len(g)
    return model.lm_head(model.model.norm(x)), tuple(presents)


def grid():
    for p in (2, 3, 4):
        for d in sorted({0, 1, p - 1}):
            for semantics in ("once", "reference"):
                yield pytest.param(p, d, semantics, id=f"p{p}-d{d}-{semantics}")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint("llama", init_std=STD, num_hidden_layers=LAYERS))


def inputs(vocab, B=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    return ids, torch.ones(B, T, dtype=torch.long), torch.arange(T).expand(B, T)


def a_plan(p, d, semantics):
    """Starts at layer 1 so that each plan has a prefix layer, several groups and a suffix."""
    end = 1 + (LAYERS - 2) // p * p
    return Plan(LAYERS, p, 1, end, bypass=d, semantics=semantics)


def max_diff(a, b):
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


@pytest.mark.parametrize("p, d, semantics", grid())
def test_graph_equals_formulas(model, p, d, semantics):
    plan = a_plan(p, d, semantics)
    assert len(plan.groups) >= 2 and plan.suffix
    gm = build_graph(model, plan)
    ids, mask, pos = inputs(model.config.vocab_size)
    with torch.no_grad():
        logits, presents = gm(ids, mask, pos, model.empty_cache(2))
        ref_logits, ref_presents = cqil_reference(model, plan, ids, mask, pos, model.empty_cache(2))
        original, _ = model(ids, mask, pos, model.empty_cache(2))
    assert max_diff(logits, ref_logits) <= ATOL
    for i, (a, b) in enumerate(zip(presents, ref_presents, strict=True)):
        assert max_diff(a, b) <= ATOL, f"present {i}"
    # CQIL changes the model by far more than the tolerance, so a pass that did nothing would fail.
    assert max_diff(logits, original) > 0.5


@pytest.mark.parametrize("p, d, semantics", [
    (2, 1, "once"), (3, 2, "reference"), (4, 0, "once"), (4, 3, "reference"),
])
def test_decode_with_cache_equals_full_recompute(model, p, d, semantics):
    plan = a_plan(p, d, semantics)
    gm = build_graph(model, plan)
    B, T, steps = 2, 5, 4
    ids, _, _ = inputs(model.config.vocab_size, B, T + steps, seed=1)
    ones = lambda n: torch.ones(B, n, dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        full, full_presents = gm(ids, ones(T + steps), torch.arange(T + steps).expand(B, -1),
                                 model.empty_cache(B))
        ref, _ = cqil_reference(model, plan, ids, ones(T + steps), torch.arange(T + steps).expand(B, -1),
                                model.empty_cache(B))
        assert max_diff(full, ref) <= ATOL
        logits, past = gm(ids[:, :T], ones(T), torch.arange(T).expand(B, -1), model.empty_cache(B))
        assert max_diff(logits, full[:, :T]) <= ATOL, "prefill"
        for step in range(steps):
            t = T + step
            logits, past = gm(ids[:, t:t + 1], ones(t + 1), torch.full((B, 1), t), past)
            assert max_diff(logits, full[:, t:t + 1]) <= ATOL, f"decode step {step}"
    for i, (a, b) in enumerate(zip(past, full_presents, strict=True)):
        assert max_diff(a, b) <= ATOL, f"present {i}"


def test_bypass_and_semantics_change_the_result(model):
    """d and the semantics are not inert: each choice gives a clearly different model."""
    ids, mask, pos = inputs(model.config.vocab_size)
    results = {}
    with torch.no_grad():
        for d, semantics in [(0, "once"), (0, "reference"), (1, "once"), (1, "reference"), (3, "once")]:
            gm = build_graph(model, a_plan(4, d, semantics))
            results[d, semantics] = gm(ids, mask, pos, model.empty_cache(2))[0]
    assert max_diff(results[0, "once"], results[0, "reference"]) == 0  # identical for d=0
    for a, b in [((0, "once"), (1, "once")), ((1, "once"), (1, "reference")), ((1, "once"), (3, "once"))]:
        assert max_diff(results[a], results[b]) > 0.01, (a, b)


@pytest.mark.parametrize("preset, p, d, semantics", [
    ("llama3", 2, 1, "reference"),  # tied embeddings, llama3 rope, head_dim != hidden / heads
    ("qwen2", 3, 2, "once"),        # q/k/v bias
    ("mistral", 2, 1, "once"),
])
def test_other_families(tiny_checkpoint, preset, p, d, semantics):
    model = load_model(tiny_checkpoint(preset, init_std=STD))
    L = model.config.num_layers
    plan = Plan(L, p, 1, 1 + (L - 2) // p * p, bypass=d, semantics=semantics)
    gm = build_graph(model, plan)
    ids, mask, pos = inputs(model.config.vocab_size)
    with torch.no_grad():
        logits, _ = gm(ids, mask, pos, model.empty_cache(2))
        ref, _ = cqil_reference(model, plan, ids, mask, pos, model.empty_cache(2))
    assert max_diff(logits, ref) <= ATOL


def test_left_padding_under_cqil(model):
    """With CQIL on, a left-padded row still equals its unpadded run at the real positions."""
    plan = a_plan(2, 1, "reference")
    gm = build_graph(model, plan)
    ids, _, _ = inputs(model.config.vocab_size, B=2, T=7, seed=4)
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, _ = gm(ids, mask, pos, model.empty_cache(2))
        alone, _ = gm(ids[1:, 3:], mask[1:, 3:], torch.arange(4)[None], model.empty_cache(1))
    assert max_diff(logits[1, 3:], alone[0]) <= ATOL


# -- graph structure ---------------------------------------------------------------------------

def graph_collectives(gm):
    """The collective nodes in graph order, named like Plan.collectives(): 'all_reduce[k]'."""
    out = []
    for n in gm.graph.nodes:
        kind = collective_kind(n)
        if kind:
            out.append(kind if kind == "broadcast" else f"{kind}[{n.meta['cqil.group']}]")
    return out


def test_graph_metadata(model):
    plan = Plan(LAYERS, 4, 1, 9, bypass=2)
    gm = build_graph(model, plan)
    assert gm.meta["cqil.plan"] == plan
    nodes = list(gm.graph.nodes)
    assert graph_collectives(gm) == plan.collectives()
    kinds = [collective_kind(n) for n in nodes if collective_kind(n)]
    assert [n.meta["cqil.collective"] for n in nodes if "cqil.collective" in n.meta] == kinds
    for k, group in enumerate(plan.groups):
        gathers = [n for n in nodes if n.target is all_gather and n.meta["cqil.group"] == k]
        reduces = [n for n in nodes if n.target is all_reduce_sum and n.meta["cqil.group"] == k]
        assert len(gathers) == len(reduces) == 1 and len(reduces[0].args) == plan.p
        group_input = None
        for i, layer in enumerate(group):
            calls = {n.target.rsplit(".", 1)[1]: n for n in nodes
                     if n.op == "call_module" and n.target.startswith(f"model.layers.{layer}.")}
            assert set(calls) == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
            for n in calls.values():
                assert (n.meta["cqil.rank"], n.meta["cqil.group"], n.meta["cqil.layer"]) == (i, k, layer)
            # every member reads the group input
            group_input = group_input or calls["input_layernorm"].args[0]
            assert calls["input_layernorm"].args[0] is group_input
    # layers outside the range are untouched and carry no rank
    for n in nodes:
        if n.meta.get("cqil.layer") in (0, 9):
            assert "cqil.rank" not in n.meta and "cqil.group" not in n.meta


@pytest.mark.parametrize("plan, expected", [
    (Plan(LAYERS, 2, 1, 9), ["broadcast"] + [f"all_reduce[{k}]" for k in range(4)]),
    (Plan(LAYERS, 2, 1, 9, replicate_outer=True), [f"all_reduce[{k}]" for k in range(4)]),
    (Plan(LAYERS, 3, 1, 7, bypass=1, replicate_outer=True),
     ["all_gather[0]", "all_reduce[0]", "all_gather[1]", "all_reduce[1]"]),
    (Plan(LAYERS, 1, 0, 0), []),
])
def test_collective_nodes_follow_the_plan(model, plan, expected):
    gm = build_graph(model, plan)
    assert graph_collectives(gm) == plan.collectives() == expected


def test_plan_for_another_model_is_refused(model):
    with pytest.raises(CqilError, match=r"plan is for 12 layers, the model has 10"):
        group_layers(trace(model), Plan(12, 2, 2, 10))


def test_pass_needs_a_traced_model(model):
    gm = trace(model)
    for n in gm.graph.nodes:
        n.meta.pop("cqil.layer", None)
    with pytest.raises(CqilError, match=r"layer 1 has no input_layernorm node.*trace"):
        group_layers(gm, Plan(LAYERS, 2, 1, 9))


# -- a LLaMA-2-70B-shaped model on meta: no weights, seconds ------------------------------------

LLAMA2_70B = dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=8192,
                  intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  hidden_act="silu")


def test_llama2_70b_on_meta():
    cfg = ModelConfig.from_hf(LLAMA2_70B)
    plan = Plan.default(cfg.num_layers, 4, bypass=1)
    assert (plan.start, plan.end, len(plan.groups), plan.depth) == (30, 78, 12, 44)
    t0 = time.perf_counter()
    model = build_meta_model(cfg)
    gm = build_graph(model, plan)
    seconds = time.perf_counter() - t0
    assert seconds < 30, f"building the 70B graph took {seconds:.1f} s"
    assert all(p.is_meta for p in gm.parameters())
    assert sum(p.numel() for p in model.parameters()) > 68e9
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (1024, 8192)
    assert graph_collectives(gm) == plan.collectives()
    assert len(plan.collectives()) == 1 + 2 * 12
    ranks = {n.meta["cqil.layer"]: n.meta["cqil.rank"] for n in gm.graph.nodes
             if n.op == "call_module" and "cqil.rank" in n.meta}
    assert ranks == {l: (l - 30) % 4 for l in range(30, 78)}
