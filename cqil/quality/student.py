"""The model being trained: the CQIL GraphModule wrapped by peft, set up for training speed and memory.

Three changes to the modules the student and the teacher share, none of which changes what is
computed (the tests compare gradients with and without them):

- attention through `F.scaled_dot_product_attention(is_causal=True)` for full sequences without
  a past (every training batch): a fused kernel that keeps no [B, heads, T, T] scores for the
  backward pass, which is what transformers' LLaMA uses by default. Calls with a past (decoding)
  keep the model's own attention, which reads the mask. Training windows are never padded.
- optionally, activation checkpointing of every Attention and MLP call (`grad_checkpoint`): their
  insides are recomputed in the backward pass. The decoder layers are traced through, so these leaf
  modules are where the graph can be cut; what stays is the residual stream between them.
- peft's LoRA layers on the target projections (the GraphModule calls modules by name, so the
  replacements are what it runs), seeded, in float32 whatever the base weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cqil.model.model import MLP, Attention, CausalLM
from cqil.passes import build_graph
from cqil.plan import Plan
from cqil.quality.lora import lora_config


def use_fused_attention(model: CausalLM):
    """Route every full-sequence attention of `model` through the fused causal kernel."""
    for module in model.modules():
        if isinstance(module, Attention) and not getattr(module, "_cqil_fused", False):
            module.attend = _fused_attend(module, module.attend)
            module._cqil_fused = True


def _fused_attend(attn: Attention, own_attend):
    gqa = attn.num_heads != attn.num_kv_heads

    def attend(q, key, value, mask):  # q [B, nh, T, hd], key/value [B, kvh, S, hd]
        if q.shape[2] != key.shape[2]:  # a past: the causal rule is not top-left aligned
            return own_attend(q, key, value, mask)
        B, T = q.shape[0], q.shape[2]
        out = F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=gqa)  # [B, nh, T, hd]
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim))

    return attend


def checkpoint_modules(model: CausalLM):
    """Recompute every Attention and MLP call in the backward pass instead of keeping its activations."""
    for module in model.modules():
        if isinstance(module, (Attention, MLP)) and not getattr(module, "_cqil_checkpointed", False):
            module.forward = _checkpointed(module.forward)
            module._cqil_checkpointed = True


def _checkpointed(forward):
    def run(*args):
        if torch.is_grad_enabled():  # the teacher (inference mode) and evaluation keep nothing anyway
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run


def build_student(model: CausalLM, plan: Plan, rank: int, alpha: float, targets, seed: int,
                  grad_checkpoint: bool = False, base_model_name: str | None = None) -> nn.Module:
    """peft(CQIL GraphModule of `model`); `model` itself becomes the teacher with the adapter disabled."""
    import peft

    use_fused_attention(model)
    if grad_checkpoint:
        checkpoint_modules(model)
    config = lora_config(model, rank, alpha, targets)
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices start random: seed them, leave the caller's RNG alone
        torch.manual_seed(seed)
        student = peft.get_peft_model(build_graph(model, plan), config, autocast_adapter_dtype=True)
    for p in student.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # the optimizer's master weights: never bf16/fp16
    student.peft_config["default"].base_model_name_or_path = base_model_name
    return student
