"""Perplexity with a sliding window, for any "logits function".

HF's strided-perplexity recipe: windows of `seq_len` tokens start every `stride` tokens; each window
scores only the tokens the previous window did not reach, so each token is scored once with at
least `seq_len - stride` tokens of context (a smaller stride: more context, more compute). Unlike
the recipe's `num_valid - batch_size` count, the bookkeeping here is exact: token t is predicted by
the logits at position t-1 of the window holding both, and "tokens" counts what was scored.

The model is only a function `ids [1, W] int64 -> logits [1, W, V]`, so the original model, the
CQIL GraphModule (with or without LoRA) and a compiled engine are measured by the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cqil.errors import CqilError

LogitsFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; targets [first_scored, end) are scored."""

    begin: int
    end: int
    first_scored: int


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> Iterator[Window]:
    """The windows of the strided recipe over a stream of `num_tokens` tokens.

    10 tokens, seq_len 6, stride 3: [0,6) scores 1..5, [3,9) scores 6..8, [6,10) scores 9.
    With stride == seq_len the windows are disjoint and each one's first token goes unscored
    (as in the recipe): [0,6) scores 1..5, [6,10) scores 7..9.
    """
    if seq_len < 2:
        raise CqilError(f"perplexity: seq_len must be >= 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise CqilError(f"perplexity: stride must satisfy 1 <= stride <= seq_len={seq_len}, got {stride}")
    scored_until = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        first = max(scored_until, begin + 1)  # a window's first token has no context in it
        if end > first:
            yield Window(begin, end, first)
            scored_until = end
        if end == num_tokens:
            break


def perplexity(logits_fn: LogitsFn, ids: torch.Tensor, seq_len: int, stride: int,
               progress: bool = False) -> dict:
    """{"perplexity", "nll" (mean, nats), "tokens" (scored), "windows"} of `ids` (1-D) under `logits_fn`."""
    ids = ids.reshape(-1).long()
    windows = list(sliding_windows(len(ids), seq_len, stride))
    if progress:
        from tqdm import tqdm
        windows = tqdm(windows, desc="perplexity", unit="window")
    nll_sum, scored = 0.0, 0
    with torch.no_grad():
        for w in windows:
            window = ids[w.begin:w.end][None]  # [1, W]
            logits = _as_tensor(logits_fn(window))  # [1, W, V]
            if logits.shape[:2] != window.shape:
                raise CqilError(f"perplexity: the model returned logits of shape {tuple(logits.shape)} "
                                f"for input {tuple(window.shape)}")
            predicting = logits[0, w.first_scored - 1 - w.begin: w.end - 1 - w.begin].float()  # [n, V]
            targets = ids[w.first_scored:w.end].to(predicting.device)  # [n]
            nll_sum += F.cross_entropy(predicting, targets, reduction="sum").item()
            scored += len(targets)
    if scored == 0:
        raise CqilError(f"perplexity: {len(ids)} token(s) leave nothing to score; at least 2 are needed")
    mean_nll = nll_sum / scored
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": scored, "windows": len(windows)}


def _as_tensor(logits) -> torch.Tensor:
    return logits.detach() if torch.is_tensor(logits) else torch.from_numpy(np.asarray(logits))
