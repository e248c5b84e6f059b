"""LoRA fine-tuning of the CQIL GraphModule, the way the authors recover quality.

The student is the CQIL GraphModule wrapped by peft; it shares the model's Attention/MLP modules,
so peft's LoRA layers are what both the student graph and the plain model call. The teacher is the
plain model (no CQIL pass) with the adapter disabled: the original network. Loss, per token,
averaged over the batch:

    kd (default):  KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))
    --no-kd:       next-token cross-entropy on the data

Batches are random windows of the token stream drawn from a generator seeded by (seed, step), so a
resumed run sees exactly the batches the uninterrupted one would have. Out folder layout::

    ADAPTER_DIR/adapter_config.json, adapter_model.safetensors, cqil_plan.json   final adapter
    ADAPTER_DIR/checkpoint/   same files + optimizer.pt + trainer_state.json         latest checkpoint

Every folder is written next to its place and renamed in; in the final adapter `cqil_plan.json`
is removed first and moved in last, so a folder holding it is a complete adapter.

Not covered: gradient accumulation, learning-rate schedules, mixed precision, several devices.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cqil.errors import CqilError
from cqil.model.adapter import PLAN_FILE, write_plan
from cqil.model.model import CausalLM
from cqil.passes import build_graph
from cqil.plan import Plan
from cqil.quality.data import check_vocab
from cqil.quality.lora import DEFAULT_TARGETS, lora_config

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
MAX_GRAD_NORM = 1.0  # as HF Trainer's default, which the authors' scripts ran under


@dataclass(frozen=True)
class Settings:
    steps: int = 200
    lr: float = 1e-4
    rank: int = 32
    alpha: float = 32
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seq_len: int = 256
    batch: int = 4
    kd: bool = True
    save_every: int = 50  # 0: no periodic checkpoints
    seed: int = 0

    def must_match_on_resume(self) -> dict:
        """Everything but steps and save_every: changing them mid-run would be a different run."""
        d = asdict(self)
        d.pop("steps"), d.pop("save_every")
        d["targets"] = list(d["targets"])
        return d


def batch_at(stream: torch.Tensor, step: int, settings: Settings) -> torch.Tensor:
    """The step's batch: `batch` random windows of seq_len + 1 tokens  [B, seq_len + 1]."""
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - settings.seq_len, (settings.batch,), generator=g)
    return torch.stack([stream[s:s + settings.seq_len + 1] for s in starts.tolist()])


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, summed over the vocabulary, averaged over tokens."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)  # [N, V]
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def _forward(fn, ids: torch.Tensor, model: CausalLM) -> torch.Tensor:
    B, T = ids.shape
    return fn(ids, torch.ones_like(ids), torch.arange(T).expand(B, T), model.empty_cache(B))[0]  # [B, T, V]


def finetune(model: CausalLM, plan: Plan, stream: torch.Tensor, settings: Settings, out_dir: str | Path,
             resume: bool = False, progress: bool = True, base_model_name: str | None = None) -> dict:
    """Train a LoRA adapter for `plan` on `stream` (1-D token ids); write it to `out_dir`.

    Returns {"steps", "start_step", "losses": [loss per step run here], "out"}. peft wraps the
    target Linear layers of `model` in place: load the model afresh to use it without the adapter.
    """
    import peft

    out = Path(out_dir)
    _check_inputs(model, plan, stream, settings, out, resume)
    state = _read_checkpoint_state(out, plan, settings) if resume else None

    config = lora_config(model, settings.rank, settings.alpha, settings.targets)
    with torch.random.fork_rng():  # LoRA's A matrices start random: seed them, leave the caller's RNG alone
        torch.manual_seed(settings.seed)
        student = peft.get_peft_model(build_graph(model, plan), config)
    student.peft_config["default"].base_model_name_or_path = base_model_name
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    start_step = 0
    if state is not None:
        start_step = _load_checkpoint(student, optimizer, state["folder"])

    losses = []
    bar = _progress(start_step, settings.steps, progress)
    for step in range(start_step, settings.steps):
        batch = batch_at(stream, step, settings)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T]
        logits = _forward(student, inputs, model)
        if settings.kd:
            with torch.no_grad(), student.disable_adapter():
                teacher = _forward(model, inputs, model)  # the plain model: no CQIL, no LoRA
            loss = distillation_loss(logits, teacher)
        else:
            loss = next_token_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
            _save_checkpoint(student, optimizer, plan, settings, done, out)
    bar.close()
    if settings.save_every:
        _save_checkpoint(student, optimizer, plan, settings, settings.steps, out)
    _write_final(student, plan, out)
    return {"steps": settings.steps, "start_step": start_step, "losses": losses, "out": str(out)}


def _check_inputs(model, plan, stream, settings, out: Path, resume: bool):
    if plan.num_layers != model.config.num_layers:
        raise CqilError(f"finetune: the plan is for {plan.num_layers} layers, the model has {model.config.num_layers}")
    if settings.steps < 1 or settings.batch < 1 or settings.seq_len < 2:
        raise CqilError(f"finetune: --steps, --batch must be >= 1 and --seq-len >= 2 "
                        f"(got {settings.steps}, {settings.batch}, {settings.seq_len})")
    if settings.lr <= 0:
        raise CqilError(f"finetune: --lr must be > 0, got {settings.lr}")
    if len(stream) < settings.seq_len + 1:
        raise CqilError(f"finetune: the data gives {len(stream)} tokens; --seq-len {settings.seq_len} needs "
                        f"at least {settings.seq_len + 1}: use more text or a smaller --seq-len")
    check_vocab(stream, model.config.vocab_size)
    if out.exists() and not out.is_dir():
        raise CqilError(f"finetune: {out} exists and is not a directory")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise CqilError(f"finetune: {out} is not empty; continue its run with --resume or choose another -o")


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="finetune", unit="step", disable=not enabled)


def _read_checkpoint_state(out: Path, plan: Plan, settings: Settings) -> dict:
    """The checkpoint to resume from; refuses one made for another plan or other settings."""
    folder = next((f for f in (out / CHECKPOINT, out / f".{CHECKPOINT}.old") if (f / STATE_FILE).is_file()), None)
    if folder is None:
        raise CqilError(f"finetune: nothing to resume in {out} (no {CHECKPOINT}/{STATE_FILE}); "
                        f"start without --resume")
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        trained_plan = Plan.from_dict(state["plan"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CqilError(f"finetune: {folder / STATE_FILE} is not a valid trainer state ({e})")
    if trained_plan != plan:
        raise CqilError(f"finetune: the checkpoint in {out} was trained for {trained_plan}, not {plan}")
    wanted = settings.must_match_on_resume()
    changed = {k: (state["settings"].get(k), v) for k, v in wanted.items() if state["settings"].get(k) != v}
    if changed:
        diffs = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise CqilError(f"finetune: cannot resume with other settings than the checkpoint's ({diffs})")
    if state["step"] > settings.steps:
        raise CqilError(f"finetune: the checkpoint is at step {state['step']}, beyond --steps {settings.steps}")
    return {**state, "folder": folder}


def _load_checkpoint(student, optimizer, folder: Path) -> int:
    import peft
    from safetensors.torch import load_file

    peft.set_peft_model_state_dict(student, load_file(str(folder / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return json.loads((folder / STATE_FILE).read_text())["step"]


def _write_adapter(student, plan: Plan, folder: Path):
    # "auto" would ask model.config.__class__.from_pretrained (an HF-config method) whether the
    # vocabulary was resized; ours never is, as embeddings are not LoRA targets.
    student.save_pretrained(str(folder), save_embedding_layers=False)
    write_plan(folder, plan)


def _save_checkpoint(student, optimizer, plan: Plan, settings: Settings, step: int, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    tmp, final, old = out / f".{CHECKPOINT}.tmp", out / CHECKPOINT, out / f".{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_adapter(student, plan, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "plan": plan.to_dict(), "settings": {**asdict(settings), "targets": list(settings.targets)}}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)  # resume falls back to .old if we stop between these two renames
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_final(student, plan: Plan, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_adapter(student, plan, tmp)
    (out / PLAN_FILE).unlink(missing_ok=True)  # the folder is not a finished adapter until it returns
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == PLAN_FILE):
        os.replace(f, out / f.name)
    tmp.rmdir()
