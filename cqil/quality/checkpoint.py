"""A fine-tuning run's folder: checkpoints to resume from, the final adapter, the training log.

    OUT/adapter_config.json, adapter_model.safetensors, cqil_plan.json     the final adapter
    OUT/checkpoint/   the same files + optimizer.pt, scheduler.pt [, scaler.pt] + trainer_state.json
    OUT/train_log.jsonl   one JSON object per step ({"step", "loss", "lr", "grad_norm", "tokens",
                          "tokens_per_s", "time"}) and per evaluation ({"step", "eval_perplexity", ...})

Every folder is written next to its place and renamed in; in the final adapter `cqil_plan.json` is
removed first and moved in last, so a folder holding it is a complete adapter. A resumed run drops
the log lines written after its checkpoint, so the log reads as one run. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from cqil.errors import CqilError
from cqil.model.adapter import PLAN_FILE, write_plan
from cqil.plan import Plan

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"


def read_state(out: Path, plan: Plan, settings, windows_per_step: int) -> dict:
    """The checkpoint to resume from; refuses one made for another plan or other settings.

    `settings.must_match_on_resume()` must be equal; the split of a step's windows into processes,
    micro-batches and accumulation may change as long as the windows per step stay the same.
    """
    folder = next((f for f in (out / CHECKPOINT, out / f".{CHECKPOINT}.old") if (f / STATE_FILE).is_file()), None)
    if folder is None:
        raise CqilError(f"finetune: nothing to resume in {out} (no {CHECKPOINT}/{STATE_FILE}); "
                        f"start without --resume")
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        trained_plan = Plan.from_dict(state["plan"])
        step, saved = int(state["step"]), dict(state["settings"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CqilError(f"finetune: {folder / STATE_FILE} is not a valid trainer state ({e})")
    if trained_plan != plan:
        raise CqilError(f"finetune: the checkpoint in {out} was trained for {trained_plan}, not {plan}")
    wanted = settings.must_match_on_resume()
    changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if state.get("windows_per_step") != windows_per_step:
        changed["windows per step (batch x grad-accum x processes)"] = (state.get("windows_per_step"), windows_per_step)
    if changed:
        diffs = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise CqilError(f"finetune: cannot resume with other settings than the checkpoint's ({diffs})")
    if step > settings.steps:
        raise CqilError(f"finetune: the checkpoint is at step {step}, beyond --steps {settings.steps}")
    return {**state, "folder": folder}


def load(folder: Path, student, optimizer, scheduler, scaler) -> int:
    """Restore LoRA weights, optimizer, schedule and loss scale; returns the step reached."""
    import peft
    from safetensors.torch import load_file

    device = next(p.device for p in student.parameters() if p.requires_grad)
    peft.set_peft_model_state_dict(student, load_file(str(folder / "adapter_model.safetensors"), device=str(device)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=device))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if scaler.is_enabled() and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    return json.loads((folder / STATE_FILE).read_text())["step"]


def _write_adapter(student, plan: Plan, folder: Path):
    # "auto" would ask model.config.__class__.from_pretrained (an HF-config method) whether the
    # vocabulary was resized; ours never is, as embeddings are not LoRA targets.
    student.save_pretrained(str(folder), save_embedding_layers=False)
    write_plan(folder, plan)


def save(out: Path, student, optimizer, scheduler, scaler, plan: Plan, state: dict):
    """Write OUT/checkpoint: the adapter, optimizer, schedule, loss scale and `state` (step, settings, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp, final, old = out / f".{CHECKPOINT}.tmp", out / CHECKPOINT, out / f".{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_adapter(student, plan, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler.is_enabled():
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "plan": plan.to_dict()}, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)  # resume falls back to .old if we stop between these two renames
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_final(out: Path, student, plan: Plan):
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_adapter(student, plan, tmp)
    (out / PLAN_FILE).unlink(missing_ok=True)  # the folder is not a finished adapter until it returns
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == PLAN_FILE):
        os.replace(f, out / f.name)
    tmp.rmdir()


class TrainLog:
    """OUT/train_log.jsonl, appended one line per record and flushed (a run stopped midway keeps its log)."""

    def __init__(self, out: Path, resume_step: int | None):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOG_FILE
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            tmp = self.path.with_name(f".{LOG_FILE}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a")

    def write(self, record: dict):
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # a line cut short by a crash: dropped
