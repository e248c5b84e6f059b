"""Train a small LLaMA from scratch on CPython's standard library and save it as an HF checkpoint.

The corpus is the `.py` source of the running interpreter's stdlib (sorted, test suites and
site-packages skipped, capped in size), split by file: every `--heldout-every`-th file is held out
and never seen by the tokenizer or the model. The tokenizer is a byte-level BPE trained on the
train split; the model is `transformers.LlamaForCausalLM` with grouped-query attention, trained in
fp32 on one thread with AdamW and a cosine schedule over the `--minutes` time budget (or over
`--steps`, which makes a run repeatable step for step).

The output folder holds what `from_pretrained` needs (config, fp16 `model.safetensors`, tokenizer
files), `heldout.txt` (capped) and `train_report.json` with the held-out perplexity of the model
and of an add-one-smoothed unigram model over the same tokenizer. It is written to a temporary
folder beside OUT_DIR and renamed into place at the end.

Left out: data-parallel or GPU training, mixed precision, checkpoint resume, hyper-parameter search.

    python tools/train_small_llama.py -o tests/fixtures/small-llama --minutes 40
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<s>", "</s>"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files(max_bytes: int) -> list[Path]:
    """Sorted stdlib `.py` files outside test suites, up to `max_bytes` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP_DIRS for p in parts[:-1]) or parts[-1].startswith("test_"):
            continue
        total += path.stat().st_size
        if total > max_bytes:
            break
        files.append(path)
    return files


def read_split(files: list[Path], every: int, heldout_bytes: int) -> tuple[list[str], str]:
    """Train documents (one per file) and the held-out text, capped at a line boundary."""
    train, heldout = [], []
    for i, path in enumerate(files):
        text = path.read_bytes().decode("utf-8", errors="replace")
        (heldout if i % every == every // 2 else train).append(text)
    held = "".join(t if t.endswith("\n") else t + "\n" for t in heldout)
    if len(held) > heldout_bytes:
        held = held[: held.rindex("\n", 0, heldout_bytes) + 1]
    return train, held


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    # Like LLaMA's tokenizer: encoding a text prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path, max_len: int) -> None:
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=max_len
    ).save_pretrained(folder)
    # transformers 5 writes its own class name ("TokenizersBackend"), which 4.x cannot resolve;
    # both resolve this one.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def encode_docs(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """One stream of <s> doc </s> <s> doc </s> ... token ids."""
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(docs):  # post-processor adds <s>
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)  # [N, T]


@torch.no_grad()
def heldout_nll(model: LlamaForCausalLM, blocks: torch.Tensor, batch: int) -> float:
    """Mean next-token NLL over non-overlapping windows (each window's first token is context)."""
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]  # [B, T]
        total += model(input_ids=x, labels=x).loss.item() * len(x)  # loss: mean over B*(T-1)
    model.train()
    return total / len(blocks)


def unigram_nll(train: torch.Tensor, blocks: torch.Tensor, vocab: int) -> float:
    """Add-one-smoothed unigram NLL on the same targets the model is scored on."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return -logp[blocks[:, 1:]].mean().item()


def lr_at(step: int, progress: float, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth of `lr` at progress 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=40.0, help="training time budget")
    ap.add_argument("--steps", type=int, help="fixed step count (overrides --minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, help="default: 8/3 * hidden rounded up to 64")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--corpus-mb", type=float, default=30.0)
    ap.add_argument("--heldout-every", type=int, default=20)
    ap.add_argument("--heldout-kb", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave a core to others)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out.resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)

    files = stdlib_files(int(args.corpus_mb * 1e6))
    train_docs, held_text = read_split(files, args.heldout_every, args.heldout_kb * 1000)
    (tmp / "heldout.txt").write_text(held_text, encoding="utf-8")
    tok = train_tokenizer(train_docs, args.vocab)
    vocab = tok.get_vocab_size()
    save_tokenizer(tok, tmp, args.max_positions)

    train_stream = encode_docs(tok, train_docs)
    train_blocks = windows(train_stream, args.seq_len)
    held_blocks = windows(torch.tensor(tok.encode(held_text).ids), args.seq_len)
    print(f"{len(files)} files, {len(train_docs)} train: {len(train_stream)} tokens "
          f"({sum(map(len, train_docs)) / len(train_stream):.2f} chars/token); "
          f"held out: {held_blocks.numel()} tokens", flush=True)

    intermediate = args.intermediate or -(-8 * args.hidden // 3 // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_positions,
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # GPT-2's scaled init of the projections that write into the residual stream: without it the
    # loss sits near the unigram level for the first ~150 steps of a short run
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight.normal_(0.0, config.initializer_range / (2 * args.layers) ** 0.5)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    # The schedule follows the elapsed fraction of the time budget, not a step count guessed up
    # front: the cores are shared, so the speed drifts. --steps makes it a pure function of step.
    order = torch.randperm(len(train_blocks))
    step, losses, t0, progress = 0, [], time.time(), 0.0
    while progress < 1:
        lr = lr_at(step, progress, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = order[(step * args.batch + torch.arange(args.batch)) % len(order)]
        x = train_blocks[idx]  # [B, T]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        dt = time.time() - t0
        progress = step / args.steps if args.steps else dt / (args.minutes * 60)
        if step % 50 == 0 or progress >= 1:
            print(f"step {step} ({progress:.0%}) loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                  f"lr {lr:.2e} {step * x.numel() / dt:.0f} tok/s {dt / 60:.1f} min", flush=True)
    train_time, final_loss = time.time() - t0, sum(losses[-50:]) / len(losses[-50:])

    model_ppl = math.exp(heldout_nll(model, held_blocks, 8))
    unigram_ppl = math.exp(unigram_nll(train_stream, held_blocks, vocab))
    report = {
        "steps": step, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_seen": step * args.batch * args.seq_len,
        "train_tokens": len(train_stream), "heldout_tokens": held_blocks.numel(),
        "train_minutes": round(train_time / 60, 2), "final_train_loss": round(final_loss, 4),
        "heldout_ppl": round(model_ppl, 3), "unigram_heldout_ppl": round(unigram_ppl, 3),
        "heldout_eval": f"non-overlapping {args.seq_len}-token windows of heldout.txt "
                        "encoded with <s>; first token of each window not scored",
        "parameters": n_params, "args": {k: str(v) if isinstance(v, Path) else v
                                         for k, v in vars(args).items()},
        "python_stdlib": sysconfig.get_paths()["stdlib"], "files": len(files),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=1), flush=True)
    model.to(torch.float16).save_pretrained(tmp)
    (tmp / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")

    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
