"""Next-token choice: a pure function of the last logits and a random generator."""

from __future__ import annotations

import numpy as np

from cqil.errors import CqilError


def check_sampling(temperature: float, top_k: int, top_p: float):
    if not temperature > 0:
        raise CqilError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise CqilError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise CqilError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: np.ndarray, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """logits [B, V] -> token ids [B] (int64). Greedy unless do_sample."""
    if not do_sample:
        return logits.argmax(-1).astype(np.int64)
    rng = rng or np.random.default_rng()
    scores = logits.astype(np.float64) / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)
