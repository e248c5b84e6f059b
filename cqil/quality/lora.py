"""LoRA configuration for CQIL's quality recovery: which Linear modules to adapt, with which rank."""

from __future__ import annotations

from torch import nn

from cqil.errors import CqilError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_module_names(model: nn.Module) -> set[str]:
    """Short names (`q_proj`, `lm_head`, ...) of the model's nn.Linear modules: what --targets may name."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def lora_config(model: nn.Module, rank: int = 32, alpha: float = 32, targets=DEFAULT_TARGETS):
    """A peft LoraConfig after checking every target names a Linear of `model`.

    peft itself only fails when *no* target matches, so a misspelt `--targets q_proj,gate_prj`
    would silently train fewer modules; here it is an error. Dropout is 0: the adapters are tiny
    next to the data, and it keeps the teacher/student comparison deterministic.
    """
    import peft

    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise CqilError("lora: --targets names no module")
    known = linear_module_names(model)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise CqilError(f"lora: the model has no Linear module named {', '.join(unknown)}; "
                        f"--targets may name {', '.join(sorted(known))}")
    if rank < 1:
        raise CqilError(f"lora: --rank must be >= 1, got {rank}")
    return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
