"""Write docs/quality.md: what CQIL costs in perplexity on the fixture model, and what LoRA wins back.

    python tools/quality_report.py [--model tests/fixtures/small-llama] [--steps 150] [--out docs/quality.md]

Rows: the original model; CQIL with p=2 and p=4 over the range cqil-analyze suggests, bypass d=0
and d=1, each before and after a short self-distillation LoRA run (cqil-finetune's defaults apart
from --steps/--lr/--seq-len/--batch). The model's `heldout.txt` is split in two: `--eval-tokens`
tokens, in blocks spread over the file, are only scored; the rest is what the similarity analysis
and the LoRA runs see, so neither the chosen range nor the adapters have seen the scored text. The
similarity plot is written next to the report.

It calls the library functions behind cqil-analyze / cqil-finetune / cqil-eval, so the numbers are
exactly what those commands print. Runs on one CPU thread. Whatever follows the `KEEP` line in an
existing report (the hand-written sections on data, training at scale and lm-evaluation-harness) is
kept; the file is replaced in one rename.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from cqil.model.loader import load_model
from cqil.plan import Plan
from cqil.model.tokenizer import load_tokenizer
from cqil.quality.data import read_text, tokenize
from cqil.quality.train import Settings, finetune
from cqil.quality.perplexity import perplexity
from cqil.quality.plot import plot_similarity
from cqil.quality.similarity import DEFAULT_THRESHOLD, measure, suggest_range
from cqil.quality.targets import model_target

ROOT = Path(__file__).resolve().parent.parent
KEEP = "<!-- Written by hand from here on: tools/quality_report.py keeps what follows this line. -->"
CAVEAT = ("Caveat: a 12-layer, 10M-parameter model trained for 30 minutes on Python source (its "
          "train_report.json: held-out perplexity 56.9, unigram 756); the numbers "
          "show the direction and rough size of CQIL's cost and of the LoRA recovery, not LLaMA-7B's "
          "magnitudes. Each adapter was trained for one plan: `cqil-eval --adapter` and "
          "`cqil-compile --adapter` refuse it for another.")


def split_blocks(ids: torch.Tensor, eval_tokens: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval): eval is `eval_tokens` worth of 1024-token blocks spread evenly over the text.

    heldout.txt is a run of source files of very different kinds (a data table is far easier than a
    parser), so a contiguous tail would measure whichever files happen to come last.
    """
    n_blocks = len(ids) // block
    wanted = min(max(1, eval_tokens // block), n_blocks // 2)
    chosen = {round(i * n_blocks / wanted + n_blocks / (2 * wanted)) for i in range(wanted)}
    blocks = [ids[i * block:(i + 1) * block] for i in range(n_blocks)]
    eval_ids = torch.cat([b for i, b in enumerate(blocks) if i in chosen])
    train_ids = torch.cat([b for i, b in enumerate(blocks) if i not in chosen] + [ids[n_blocks * block:]])
    return train_ids, eval_ids


def evaluate(model_dir, plan, ids, seq_len, stride, adapter=None) -> float:
    target = model_target(model_dir, plan, adapter)
    return perplexity(target.logits, ids, seq_len, stride)["perplexity"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "tests/fixtures/small-llama"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(ROOT / "docs/quality.md"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--ps", default="2,4")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model_dir = Path(args.model)
    out = Path(args.out)
    ids = tokenize(load_tokenizer(model_dir), read_text(model_dir / "heldout.txt"))
    train_ids, eval_ids = split_blocks(ids, args.eval_tokens)
    cfg_layers = load_model(model_dir).config.num_layers
    started = time.perf_counter()

    sim = measure(load_model(model_dir), train_ids[:8192], args.seq_len, max_offset=max(int(p) for p in args.ps.split(",")) - 1)
    rows = [("original", "-", "-", evaluate(model_dir, Plan(cfg_layers, 1, 0, 0), eval_ids, args.seq_len, args.stride), None, None)]
    suggestions = {}
    for p in (int(x) for x in args.ps.split(",")):
        suggestion = suggest_range(sim, p, DEFAULT_THRESHOLD)
        suggestions[p] = suggestion
        for d in (0, 1):
            plan = Plan(cfg_layers, p, suggestion.plan.start, suggestion.plan.end, bypass=d)
            before = evaluate(model_dir, plan, eval_ids, args.seq_len, args.stride)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                settings = Settings(steps=args.steps, lr=args.lr, rank=args.rank, alpha=args.rank,
                                    seq_len=args.seq_len, batch=args.batch, save_every=0)
                finetune(load_model(model_dir), plan, train_ids, settings, Path(tmp) / "adapter", progress=False)
                after = evaluate(model_dir, plan, eval_ids, args.seq_len, args.stride, Path(tmp) / "adapter")
            rows.append((f"CQIL p={p}", f"[{plan.start}, {plan.end})", str(d), before, after, time.perf_counter() - t0))
            print(rows[-1], flush=True)

    plot_name = out.with_name(out.stem + "-similarity.png")
    best = suggestions[min(suggestions)]
    plot_similarity(sim, best, DEFAULT_THRESHOLD, plot_name, title=f"{model_dir.name}: layer-input similarity")
    write_report(out, render(args, model_dir, sim, suggestions, rows, plot_name, len(train_ids), len(eval_ids),
                             time.perf_counter() - started))
    print(f"wrote {out}")


def write_report(out: Path, report: str):
    """`report`, then the hand-written part of the existing file (from the KEEP line on)."""
    old = out.read_text() if out.is_file() else ""
    kept = old[old.index(KEEP):] if KEEP in old else ""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(report.rstrip("\n") + "\n\n" + kept if kept else report)
    os.replace(tmp, out)


def render(args, model_dir, sim, suggestions, rows, plot_name, n_train, n_eval, seconds) -> str:
    original = rows[0][3]
    lines = [
        "# CQIL quality on the fixture model",
        "",
        f"Written by `python tools/quality_report.py --steps {args.steps} --lr {args.lr} --rank {args.rank} "
        f"--seq-len {args.seq_len} --batch {args.batch} --stride {args.stride} --eval-tokens {args.eval_tokens} "
        f"--threads {args.threads}` ({seconds / 60:.1f} min on {args.threads} CPU thread(s)).",
        "",
        f"Model: `{model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir}` "
        f"({sim.num_layers} layers). Text: its `heldout.txt` (never seen in its training), split in two: "
        f"{n_eval} tokens in 1024-token blocks spread over the file are only scored, the other {n_train} tokens "
        f"are what the similarity analysis and the LoRA runs see. Perplexity: windows of {args.seq_len} tokens, stride {args.stride} (cqil-eval's code).",
        "",
        "| model | range | d | perplexity | vs original | after LoRA (KD) | vs original | LoRA time |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rng, d, before, after, t in rows:
        rel = lambda x: f"{100 * (x / original - 1):+.1f}%"
        lines.append(f"| {name} | {rng} | {d} | {before:.3f} | {rel(before) if name != 'original' else ''} | "
                     f"{f'{after:.3f}' if after is not None else ''} | {rel(after) if after is not None else ''} | "
                     f"{f'{t:.0f} s' if t is not None else ''} |")
    lines += ["", "Suggested ranges (`cqil-analyze`, threshold "
              f"{DEFAULT_THRESHOLD} on the similarity of each layer's input to its group's input):", ""]
    for p, s in suggestions.items():
        stats = (f"min {s.min_similarity:.4f}, mean {s.mean_similarity:.4f}" if s.min_similarity is not None else "")
        lines.append(f"- p={p}: [{s.plan.start}, {s.plan.end}), {len(s.plan.groups)} groups, depth "
                     f"{s.plan.num_layers} -> {s.plan.depth}; {stats}; {s.rule}")
    lines += ["", "Adjacent-layer input similarity cos(x_l, x_{l+1}): " +
              ", ".join(f"{x:.3f}" for x in sim.adjacent), ""]
    if plot_name:
        lines += [f"![layer-input similarity]({plot_name.name})", ""]
    lines += [
        f"LoRA: self-distillation KL(original || CQIL), r={args.rank}, alpha={args.rank}, all seven projections, "
        f"{args.steps} steps of {args.batch} x {args.seq_len} tokens, AdamW lr {args.lr} (the authors' 1e-4 is for "
        "~0.5B tokens; a short run needs a larger step). d=1 uses the 'once' semantics.",
        "",
        CAVEAT,
        "",
        *claims(rows, sim.adjacent),
    ]
    return "\n".join(lines)


def claims(rows, adjacent) -> list[str]:
    """The paper's claims, checked against this run's numbers (rows: name, range, d, before, after, t)."""
    original = rows[0][3]
    pct = lambda x: 100 * (x / original - 1)
    by = {(name, d): (before, after) for name, _, d, before, after, _ in rows[1:]}
    ps = sorted({name for name, _ in by})
    lines = ["## Do the paper's claims hold at this scale?", "",
             f"- Adjacent layer inputs are similar past the first layers: {adjacent[0]:.3f} for layers 0/1, "
             f"{min(adjacent[1:]):.3f}-{max(adjacent[1:]):.3f} after that"
             + (" (yes; not monotonic in depth at this size)." if min(adjacent[1:]) > adjacent[0] else " (no).")]
    cost = ", ".join(f"{n}: {pct(by[(n, '0')][0]):+.1f}%" for n in ps)
    lines.append(f"- Untuned CQIL cost over the suggested range (d=0): {cost}.")
    for n in ps:
        (b0, a0), (b1, a1) = by[(n, "0")], by[(n, "1")]
        verdict = "helps" if b1 < b0 and a1 <= a0 else "does not help consistently"
        lines.append(f"- Bypass d=1 vs d=0, {n}: {b1:.2f} vs {b0:.2f} before LoRA, {a1:.2f} vs {a0:.2f} after: "
                     f"the bypass {verdict} here.")
    for n in ps:
        before, after = by[(n, "0")]
        share = (before - after) / (before - original) if before > original else float("nan")
        verdict = "most of it" if share > 0.5 else "part of it" if share > 0 else "none of it"
        lines.append(f"- LoRA recovery, {n} (d=0): {pct(before):+.1f}% -> {pct(after):+.1f}%, "
                     f"{100 * share:.0f}% of the loss recovered: {verdict}.")
    return lines + [""]


if __name__ == "__main__":
    main()
