"""Trace `CausalLM` into a torch.fx GraphModule.

Leaf modules: `Attention`, `MLP`, `RMSNorm`, `RotaryEmbedding` (and therefore the embedding and
lm_head `nn.Linear`, which fx keeps as leaves anyway). `DecoderLayer` is traced through so that the
residual additions are graph nodes the CQIL pass can rewrite. Every node created inside decoder
layer N carries `node.meta["cqil.layer"] = N`.

One layer of the traced graph::

    model_layers_3_input_layernorm = self.model.layers.3.input_layernorm(add_5)
    model_layers_3_self_attn = self.model.layers.3.self_attn(model_layers_3_input_layernorm, cos, sin, mask, getitem_6, getitem_7)
    getitem_8 = model_layers_3_self_attn[0]                       # attention output   [B, T, H]
    add_6 = add_5 + getitem_8                                     # h
    model_layers_3_post_attention_layernorm = ...(add_6)
    model_layers_3_mlp = self.model.layers.3.mlp(...)
    add_7 = add_6 + model_layers_3_mlp                            # layer output       [B, T, H]
    getitem_9 = model_layers_3_self_attn[1]; getitem_10 = model_layers_3_self_attn[2]   # present k/v
"""

from __future__ import annotations

import re

import torch.fx as fx
from torch import nn

from cqil.model.model import MLP, Attention, CausalLM, RMSNorm, RotaryEmbedding

LEAVES = (Attention, MLP, RMSNorm, RotaryEmbedding)
_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)$")


class CqilTracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.current_layer: int | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        match = _LAYER_PATH.match(self.path_of_module(m))
        if not match:
            return super().call_module(m, forward, args, kwargs)
        self.current_layer = int(match.group(1))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.current_layer = None

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.current_layer is not None:
            node.meta["cqil.layer"] = self.current_layer
        return node


def trace(model: CausalLM) -> fx.GraphModule:
    """Symbolically trace `model` (weights may be on meta: tracing never runs a leaf)."""
    tracer = CqilTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(model, graph, "CausalLM")
    gm.config = model.config
    _name_values(gm)
    return gm


def _name_values(gm: fx.GraphModule):
    """Readable tensor names (meta["cqil.value"]) for values that may cross segment boundaries."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "rotary_emb":
            for user in node.users:
                user.meta["cqil.value"] = ("rope.cos", "rope.sin")[user.args[1]]
        elif node.op == "call_module" and node.target.endswith(".self_attn"):
            node.args[3].meta["cqil.value"] = "attention_bias"
        elif node.op == "call_module" and node.target.endswith(".mlp"):
            layer = node.meta["cqil.layer"]
            for user in node.users:  # the residual add: the layer's output
                user.meta["cqil.value"] = f"hidden.{layer + 1}"
