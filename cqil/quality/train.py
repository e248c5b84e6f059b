"""LoRA fine-tuning of the CQIL GraphModule, the way the authors recover quality.

The student is the CQIL GraphModule wrapped by peft (`cqil.quality.student`); it shares the
model's Attention/MLP modules, so peft's LoRA layers are what both the student graph and the plain
model call. The teacher is the plain model (no CQIL pass) with the adapter disabled, run in
inference mode: the original network. Loss, per token, averaged over the step's windows:

    kd (default):  KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))
    --no-kd:       next-token cross-entropy on the data

One optimizer step sees `batch x grad_accum x processes` windows of `seq_len + 1` tokens, drawn at
random from the token stream by a generator seeded with (seed, step): a resumed run, or the same
step split another way (accumulation, processes), sees exactly the same windows. Process r takes
micro-batches r*grad_accum .. (r+1)*grad_accum - 1 of them.

Precision: fp32, or bf16/fp16 autocast for the student with the frozen base weights stored in that
dtype (LoRA weights and the optimizer stay fp32; fp16 adds loss scaling). The teacher runs in the
same precision, or in fp32 with `teacher_fp32` (the base weights then stay fp32). AdamW, gradient
clipping to `max_grad_norm`, and a warmup + constant / linear / cosine schedule from transformers.

The command line is `cqil.quality.finetune`; data parallelism `cqil.quality.ddp`; the run's folder
(checkpoints, final adapter, JSONL log) `cqil.quality.checkpoint`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cqil.errors import CqilError
from cqil.model.model import CausalLM
from cqil.plan import Plan
from cqil.quality import checkpoint
from cqil.quality.ddp import Workers
from cqil.quality.data import as_long, check_vocab
from cqil.quality.lora import DEFAULT_TARGETS
from cqil.quality.perplexity import perplexity
from cqil.quality.student import build_student
from cqil.quality.targets import PRECISIONS, torch_device

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}  # ours -> transformers'


@dataclass(frozen=True)
class Settings:
    steps: int = 200
    lr: float = 1e-4
    rank: int = 32
    alpha: float = 32
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seq_len: int = 256
    batch: int = 4  # windows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    kd: bool = True
    precision: str = "fp32"  # fp32 | bf16 | fp16
    teacher_fp32: bool = False
    schedule: str = "constant"  # constant | linear | cosine, after `warmup` steps of linear warmup
    warmup: int = 0
    max_grad_norm: float = 1.0  # as HF Trainer's default, which the authors' scripts ran under; 0 = no clipping
    save_every: int = 50  # 0: no periodic checkpoints
    eval_every: int = 0  # 0: no periodic held-out perplexity
    seed: int = 0
    device: str = "cpu"
    grad_checkpoint: bool = False

    def __post_init__(self):
        if min(self.steps, self.batch, self.grad_accum) < 1 or self.seq_len < 2:
            raise CqilError(f"finetune: --steps, --batch, --grad-accum must be >= 1 and --seq-len >= 2 "
                            f"(got {self.steps}, {self.batch}, {self.grad_accum}, {self.seq_len})")
        if self.lr <= 0 or min(self.max_grad_norm, self.warmup, self.save_every, self.eval_every) < 0:
            raise CqilError(f"finetune: --lr must be > 0 and --max-grad-norm, --warmup, --save-every, --eval-every "
                            f">= 0 (got {self.lr}, {self.max_grad_norm}, {self.warmup}, {self.save_every}, "
                            f"{self.eval_every})")
        if self.precision not in PRECISIONS or self.schedule not in SCHEDULES:
            raise CqilError(f"finetune: precision must be one of {', '.join(PRECISIONS)} and schedule one of "
                            f"{', '.join(SCHEDULES)} (got {self.precision!r}, {self.schedule!r})")
        if self.teacher_fp32 and self.precision == "fp32":
            raise CqilError("finetune: --teacher-fp32 only means something with --precision bf16 or fp16")

    def must_match_on_resume(self) -> dict:
        """What a resumed run must share with its checkpoint: changing it midway would be another run.

        Free to change: steps, save/eval frequency, device, checkpointing, and how a step's windows
        are split into micro-batches and processes (read_state checks their total).
        """
        d = asdict(self)
        for free in ("steps", "save_every", "eval_every", "device", "grad_checkpoint", "batch", "grad_accum"):
            d.pop(free)
        d["targets"] = list(d["targets"])
        return d

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the frozen weights are stored in."""
        return torch.float32 if self.teacher_fp32 else PRECISIONS[self.precision]


def windows_at(stream, step: int, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """The step's `count` random windows of seq_len + 1 tokens  [count, seq_len + 1] int64."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len, (count,), generator=g)
    return torch.stack([as_long(stream[s:s + seq_len + 1]) for s in starts.tolist()])


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, summed over the vocabulary, averaged over tokens."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)  # [N, V]
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def _forward(fn, ids: torch.Tensor, model: CausalLM) -> torch.Tensor:
    B, T = ids.shape
    return fn(ids, torch.ones_like(ids), torch.arange(T, device=ids.device).expand(B, T), model.empty_cache(B))[0]


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


class Step:
    """What one optimizer step needs: the student (maybe DDP-wrapped), the teacher, the data."""

    def __init__(self, student, runner, teacher: CausalLM, stream, settings: Settings, workers: Workers,
                 device: torch.device, scaler):
        self.student, self.runner, self.teacher, self.stream = student, runner, teacher, stream
        self.settings, self.workers, self.device, self.scaler = settings, workers, device, scaler

    @property
    def windows_per_step(self) -> int:
        return self.settings.batch * self.settings.grad_accum * self.workers.world_size

    def micro_loss(self, ids: torch.Tensor) -> torch.Tensor:
        s = self.settings
        inputs, targets = ids[:, :-1], ids[:, 1:]  # [B, T]
        with _autocast(self.device, s.precision):
            logits = _forward(self.runner, inputs, self.teacher)
        if not s.kd:
            return next_token_loss(logits, targets)
        teacher_precision = "fp32" if s.teacher_fp32 else s.precision
        with torch.inference_mode(), self.student.disable_adapter(), _autocast(self.device, teacher_precision):
            teacher = _forward(self.teacher, inputs, self.teacher)  # the plain model: no CQIL, no LoRA
        return distillation_loss(logits, teacher)

    def gradients(self, step: int) -> torch.Tensor:
        """Accumulate this process's share of step `step` into .grad; the loss averaged over all windows."""
        s, w = self.settings, self.workers
        windows = windows_at(self.stream, step, s.seq_len, self.windows_per_step, s.seed)
        mine = windows[w.rank * s.grad_accum * s.batch:(w.rank + 1) * s.grad_accum * s.batch]
        total = torch.zeros((), device=self.device)
        for m in range(s.grad_accum):
            last = m == s.grad_accum - 1
            sync = nullcontext() if last or not w.parallel else self.runner.no_sync()  # all-reduce once per step
            with sync:
                loss = self.micro_loss(mine[m * s.batch:(m + 1) * s.batch].to(self.device))
                self.scaler.scale(loss / s.grad_accum).backward()
            total += loss.detach()
        return w.mean(total / s.grad_accum)


def finetune(model: CausalLM, plan: Plan, stream, settings: Settings, out_dir: str | Path, resume: bool = False,
             progress: bool = True, base_model_name: str | None = None, eval_ids=None,
             workers: Workers = Workers()) -> dict:
    """Train a LoRA adapter for `plan` on `stream` (1-D token ids); rank 0 writes it to `out_dir`.

    Returns {"steps", "start_step", "losses": [loss per step run here], "evals": [...], "out"}.
    The model is moved to the device and wrapped by peft in place: load it afresh to use it
    without the adapter. `eval_ids` (1-D ids) are scored every `settings.eval_every` steps.
    """
    out = Path(out_dir)
    _check_inputs(model, plan, stream, settings, out, resume, eval_ids)
    device = workers.device(torch_device(settings.device))
    windows_per_step = settings.batch * settings.grad_accum * workers.world_size
    state = checkpoint.read_state(out, plan, settings, windows_per_step) if resume else None
    workers.start(device)
    try:
        return _train(model, plan, stream, settings, out, state, progress, base_model_name, eval_ids, workers, device)
    finally:
        workers.stop()


def _train(model, plan, stream, settings, out, state, progress, base_model_name, eval_ids, workers, device) -> dict:
    import transformers

    for p in model.parameters():  # parameters only: the rope frequencies stay fp32
        p.data = p.data.to(device=device, dtype=settings.base_dtype)
    model.to(device)
    student = build_student(model, plan, settings.rank, settings.alpha, settings.targets, settings.seed,
                            settings.grad_checkpoint, base_model_name)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    scheduler = transformers.get_scheduler(SCHEDULES[settings.schedule], optimizer, num_warmup_steps=settings.warmup,
                                           num_training_steps=settings.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    start_step = checkpoint.load(state["folder"], student, optimizer, scheduler, scaler) if state else 0
    run = Step(student, workers.wrap(student, device), model, stream, settings, workers, device, scaler)
    tokens_per_step = run.windows_per_step * settings.seq_len
    log = checkpoint.TrainLog(out, start_step if state else None) if workers.is_main else None
    losses, evals = [], []

    def evaluate(step):
        if workers.is_main:
            result = _perplexity(student, model, eval_ids, settings, device)
            evals.append({"step": step, "eval_perplexity": result["perplexity"], "eval_nll": result["nll"],
                          "eval_tokens": result["tokens"]})
            log.write(evals[-1])
            if progress:
                bar.write(f"finetune: step {step}: held-out perplexity {result['perplexity']:.4f}", file=sys.stderr)
        workers.barrier()

    bar = _progress(start_step, settings.steps, progress and workers.is_main)
    if settings.eval_every and start_step == 0:
        evaluate(0)
    t_start = time.perf_counter()
    for step in range(start_step, settings.steps):
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        loss = run.gradients(step).item()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm or math.inf).item()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done, dt = step + 1, time.perf_counter() - t0
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.2e}", refresh=False)
        if log is not None:
            log.write({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": done * tokens_per_step,
                       "tokens_per_s": tokens_per_step / dt, "time": time.perf_counter() - t_start})
        if settings.eval_every and (done % settings.eval_every == 0 or done == settings.steps):
            evaluate(done)
        if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
            _save(out, student, optimizer, scheduler, scaler, plan, settings, done, run, workers)
    bar.close()
    if settings.save_every:
        _save(out, student, optimizer, scheduler, scaler, plan, settings, settings.steps, run, workers)
    if workers.is_main:
        checkpoint.write_final(out, student, plan)
        log.close()
    workers.barrier()
    return {"steps": settings.steps, "start_step": start_step, "losses": losses, "evals": evals, "out": str(out)}


def _save(out, student, optimizer, scheduler, scaler, plan, settings, step, run, workers):
    if workers.is_main:
        state = {"step": step, "settings": {**asdict(settings), "targets": list(settings.targets)},
                 "windows_per_step": run.windows_per_step, "world_size": workers.world_size}
        checkpoint.save(out, student, optimizer, scheduler, scaler, plan, state)
    workers.barrier()


def _perplexity(student, model, ids, settings: Settings, device) -> dict:
    """Held-out perplexity of the student (CQIL + LoRA), in the training precision, windows of seq_len."""
    def logits(window):
        with torch.no_grad(), _autocast(device, settings.precision):
            return _forward(student, window.to(device), model)

    return perplexity(logits, as_long(ids), settings.seq_len, max(settings.seq_len // 2, 1))


def _check_inputs(model, plan, stream, settings: Settings, out: Path, resume: bool, eval_ids):
    s = settings
    if plan.num_layers != model.config.num_layers:
        raise CqilError(f"finetune: the plan is for {plan.num_layers} layers, the model has {model.config.num_layers}")
    if len(stream) < s.seq_len + 1:
        raise CqilError(f"finetune: the data gives {len(stream)} tokens; --seq-len {s.seq_len} needs "
                        f"at least {s.seq_len + 1}: use more text or a smaller --seq-len")
    check_vocab(stream, model.config.vocab_size)
    if s.eval_every and eval_ids is None:
        raise CqilError("finetune: --eval-every needs held-out data (--eval-data)")
    if eval_ids is not None:
        check_vocab(eval_ids, model.config.vocab_size)
    if out.exists() and not out.is_dir():
        raise CqilError(f"finetune: {out} exists and is not a directory")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise CqilError(f"finetune: {out} is not empty; continue its run with --resume or choose another -o")


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="finetune", unit="step", disable=not enabled, file=sys.stderr)
