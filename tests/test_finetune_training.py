"""cqil-finetune at scale, on CPU: precision, accumulation, checkpointing, schedule, log, resume.

Tiny random LLaMAs (6 layers); every comparison is against the same computation done another way:
accumulated micro-batches against one batch, recomputed activations against kept ones, the fused
attention against the model's own, a resumed run against an uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch

from cqil.cli_util import run_main
from cqil.errors import CqilError
from cqil.model.loader import load_model
from cqil.plan import Plan
from cqil.quality import cli
from cqil.quality.ddp import Workers
from cqil.quality.lora import DEFAULT_TARGETS
from cqil.quality.student import build_student, use_fused_attention
from cqil.quality.train import Settings, Step, finetune, windows_at

PLAN = Plan(6, 2, 1, 5, bypass=1)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama", init_std=0.1)


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3))


def step_gradients(model_dir, stream, settings: Settings):
    """(loss, {name: grad}) of step 0, LoRA B started random so that every LoRA weight gets a gradient."""
    model = load_model(model_dir)
    student = build_student(model, PLAN, 4, 8, DEFAULT_TARGETS, seed=0, grad_checkpoint=settings.grad_checkpoint)
    g = torch.Generator().manual_seed(7)
    for name, p in student.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = Step(student, student, model, stream, settings, Workers(), torch.device("cpu"), scaler).gradients(0)
    return loss.item(), {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}


def assert_same_gradients(a, b, rtol=1e-5, atol=1e-7):
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert set(a[1]) == set(b[1]) and len(a[1]) == 2 * 7 * 6
    for name in a[1]:
        assert a[1][name].abs().max() > 0, name
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


def test_accumulation_equals_one_big_batch(model_dir, stream):
    """4 micro-batches of 2 windows = one batch of 8: the same windows, the same mean loss and gradients."""
    one = step_gradients(model_dir, stream, Settings(seq_len=16, batch=8, grad_accum=1))
    four = step_gradients(model_dir, stream, Settings(seq_len=16, batch=2, grad_accum=4))
    assert_same_gradients(one, four)


def test_grad_checkpoint_keeps_the_gradients(model_dir, stream):
    kept = step_gradients(model_dir, stream, Settings(seq_len=16, batch=2))
    recomputed = step_gradients(model_dir, stream, Settings(seq_len=16, batch=2, grad_checkpoint=True))
    assert_same_gradients(kept, recomputed, rtol=0, atol=0)


def test_fused_attention_equals_the_models_own(model_dir):
    """Full sequences go through the fused causal kernel, steps with a past through the model's attention."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    run = lambda m, x, past, start: m(x, torch.ones(2, start + x.shape[1], dtype=torch.long),
                                      torch.arange(start, start + x.shape[1]).expand(2, -1), past)
    model = load_model(model_dir)
    with torch.no_grad():
        want, presents = run(model, ids, model.empty_cache(2), 0)
        want_next = run(model, ids[:, :1], presents, 12)[0]
        use_fused_attention(model)
        got, got_presents = run(model, ids, model.empty_cache(2), 0)
        got_next = run(model, ids[:, :1], presents, 12)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_next, want_next)


def test_windows_split_over_processes_and_micro_batches(stream):
    """A step's windows do not depend on how they are split; process r takes its own consecutive share."""
    all8 = windows_at(stream, 5, 16, 8, seed=0)
    assert all8.shape == (8, 17) and torch.equal(all8, windows_at(stream, 5, 16, 8, seed=0))
    assert not torch.equal(all8, windows_at(stream, 6, 16, 8, seed=0))
    for w in all8:
        start = next(s for s in range(len(stream) - 16) if torch.equal(stream[s:s + 17], w))
        assert start >= 0


def read_log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_bf16_trains_and_resumes_exactly(model_dir, tmp_path, monkeypatch):
    """bf16 autocast on one repeated window: the loss falls; killed in step 6 and resumed from the
    step-4 checkpoint, the run ends bit for bit where the uninterrupted one does, with the same log."""
    window = torch.randint(0, 256, (33,), generator=torch.Generator().manual_seed(5))  # every window is this one
    settings = Settings(steps=8, lr=2e-2, rank=4, alpha=8, seq_len=32, batch=2, grad_accum=2, precision="bf16",
                        schedule="cosine", warmup=2, save_every=4)
    full = finetune(load_model(model_dir), PLAN, window, settings, tmp_path / "full", progress=False)
    assert full["losses"][-1] < 0.5 * full["losses"][0]

    def crash_in_step_6(self, step, gradients=Step.gradients):
        if step == 5:
            raise KeyboardInterrupt
        return gradients(self, step)

    with monkeypatch.context() as m:
        m.setattr(Step, "gradients", crash_in_step_6)
        with pytest.raises(KeyboardInterrupt):
            finetune(load_model(model_dir), PLAN, window, settings, tmp_path / "resumed", progress=False)
    assert [r["step"] for r in read_log(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    (tmp_path / "resumed" / "train_log.jsonl").open("a").write('{"ste')  # and a line cut short
    resumed = finetune(load_model(model_dir), PLAN, window, settings, tmp_path / "resumed", resume=True,
                       progress=False)
    assert resumed["start_step"] == 4 and resumed["losses"] == full["losses"][4:]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a) and a
    keys = ("step", "loss", "lr", "grad_norm", "tokens")
    assert [[r[k] for k in keys] for r in read_log(tmp_path / "resumed")] == \
        [[r[k] for k in keys] for r in read_log(tmp_path / "full")]
    lrs = [r["lr"] for r in read_log(tmp_path / "full")]
    assert lrs[:3] == pytest.approx([0.0, 1e-2, 2e-2]) and lrs[2] > lrs[5] > lrs[7] > 0  # warmup, then cosine
    with pytest.raises(CqilError, match="other settings.*precision 'bf16' -> 'fp32'"):
        finetune(load_model(model_dir), PLAN, window, Settings(**{**settings.__dict__, "precision": "fp32"}),
                 tmp_path / "resumed", resume=True, progress=False)
    with pytest.raises(CqilError, match=r"windows per step .* 4 -> 2"):
        finetune(load_model(model_dir), PLAN, window, Settings(**{**settings.__dict__, "grad_accum": 1}),
                 tmp_path / "resumed", resume=True, progress=False)


def test_fp16_with_fp32_teacher_and_eval_log(model_dir, stream, tmp_path):
    """fp16 (loss scaling) with an fp32 teacher; held-out perplexity lands in the log at 0, 2, 3."""
    settings = Settings(steps=3, lr=1e-2, rank=4, alpha=8, seq_len=16, batch=2, precision="fp16", teacher_fp32=True,
                        eval_every=2, save_every=2)
    result = finetune(load_model(model_dir), PLAN, stream, settings, tmp_path / "a", progress=False,
                      eval_ids=stream[:64])
    evals = [r for r in read_log(tmp_path / "a") if "eval_perplexity" in r]
    assert [e["step"] for e in evals] == [0, 2, 3] == [e["step"] for e in result["evals"]]
    assert all(1 < e["eval_perplexity"] < 1000 and e["eval_tokens"] == 63 for e in evals)
    assert (tmp_path / "a" / "checkpoint" / "scaler.pt").is_file() and all(r > 0 for r in result["losses"])


@pytest.mark.parametrize("flags, message", [
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--warmup", "-1"], "--warmup"),
    (["--teacher-fp32"], "--teacher-fp32 only means something"),
    (["--eval-every", "5"], "--eval-every needs held-out data"),
    (["--device", "cuda:0"], "no CUDA device"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--launcher", "torchrun"], "--nproc-per-node"),
])
def test_bad_training_flags(model_dir, tmp_path, capsys, flags, message):
    if message == "no CUDA device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = tmp_path / "ids.npy"
    import numpy as np

    np.save(data, np.arange(100) % 256)
    argv = [str(model_dir), "--p", "2", "--start", "1", "--end", "5", "--data", str(data), "-o", str(tmp_path / "out")]
    rc = run_main("cqil-finetune", cli.finetune_main, [*argv, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
