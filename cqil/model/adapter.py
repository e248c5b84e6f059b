"""LoRA adapters for a CQIL plan: the plan an adapter was trained for, checks, merging.

An adapter folder is a standard peft adapter (adapter_config.json + adapter_model.safetensors) plus
`cqil_plan.json`, the `Plan.to_dict()` it was trained under. Parameter names are the HF ones
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so peft also loads these
adapters onto `transformers.LlamaForCausalLM`, and `merge_adapter` loads the authors' released
adapters once their plan is confirmed.

LoRA repairs the error of one particular grouping of layers: an adapter trained for S12 E30 p=2
does not fit p=4, so merging checks the plan first. Training adapters is `cqil.quality`'s business;
merging one is part of loading a model (`cqil.model.loader.load_model(..., adapter=...)`).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from cqil.errors import CqilError, first_line
from cqil.plan import Plan

PLAN_FILE = "cqil_plan.json"


def same_computation(a: Plan, b: Plan) -> bool:
    """Whether two plans compute the same function (placement such as replicate_outer is ignored)."""
    if not a.groups or not b.groups:
        return not a.groups and not b.groups and a.num_layers == b.num_layers
    semantics_matter = a.bypass > 0
    return ((a.num_layers, a.p, a.start, a.end, a.bypass) == (b.num_layers, b.p, b.start, b.end, b.bypass)
            and (not semantics_matter or a.semantics == b.semantics))


def write_plan(folder: Path, plan: Plan):
    (Path(folder) / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")


def read_adapter_plan(adapter_dir: str | Path) -> Plan | None:
    """The plan recorded in an adapter folder, or None when it records none."""
    path = Path(adapter_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise CqilError(f"adapter: {path} is not a valid plan ({e})")


def check_adapter_folder(adapter_dir: str | Path) -> Path:
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise CqilError(f"adapter: {folder} is not a directory")
    if not (folder / "adapter_config.json").is_file():
        raise CqilError(f"adapter: {folder} has no adapter_config.json (not a peft adapter folder)")
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise CqilError(f"adapter: {folder} has no adapter_model.safetensors")
    return folder


def check_adapter_plan(adapter_dir: str | Path, plan: Plan, allow_plan_mismatch: bool = False) -> Plan | None:
    """Refuse an adapter trained for another plan (or for an unknown one) unless allowed."""
    trained = read_adapter_plan(adapter_dir)
    if allow_plan_mismatch:
        return trained
    if trained is None:
        raise CqilError(f"adapter: {adapter_dir} has no {PLAN_FILE}, so the plan it was trained for is unknown; "
                        f"allow a plan mismatch (--allow-plan-mismatch) if you know it fits {plan}")
    if not same_computation(trained, plan):
        raise CqilError(f"adapter: {adapter_dir} was trained for {trained}, not for {plan}; use that plan "
                        f"(--p {trained.p} --start {trained.start} --end {trained.end} --bypass {trained.bypass}) "
                        f"or allow the mismatch (--allow-plan-mismatch)")
    return trained


def merge_adapter(model: nn.Module, adapter_dir: str | Path, plan: Plan, allow_plan_mismatch: bool = False) -> nn.Module:
    """`model` with the LoRA adapter in `adapter_dir` merged into its weights (peft's merge_and_unload).

    Checks first that the adapter was trained for `plan` (see `check_adapter_plan`). Returns the
    same model object, its Linear weights now W + (alpha/r) B A, with no peft wrappers left, so
    tracing and export see a plain model.
    """
    import peft

    folder = check_adapter_folder(adapter_dir)
    num_layers = getattr(getattr(model, "config", None), "num_layers", None)
    if num_layers is not None and plan.num_layers != num_layers:
        raise CqilError(f"adapter: the plan is for {plan.num_layers} layers, the model has {num_layers}")
    check_adapter_plan(folder, plan, allow_plan_mismatch)
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(folder))
    except Exception as e:  # wrong shapes, unknown target modules, broken files
        raise CqilError(f"adapter: cannot load {folder} onto this model: {first_line(e)}") from None
    return wrapped.merge_and_unload()
