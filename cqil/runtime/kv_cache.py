"""A rank's KV cache for one Generator: the protocol every backend's cache follows, and the plain one.

The Engine runs a step as

    cache.begin(env)          # the rank's past keys/values (or whatever the backend needs) into env
    ... the rank's program ...
    cache.end(env, new)       # keep this step's presents; `new` tokens were added

Each Generator owns one cache per rank, so several generators on one engine never share KV state.
The cache holds, per layer of the rank, keys and values [B, kv_heads, length, head_dim]: every
row has the same `length` (left padding included, which the attention mask hides).

Between steps the Generator reshapes its batch (continuous batching, `Generator.merge/select`,
and `rewind`) with four operations, each of which leaves a cache that the next `begin` accepts:

    rewind(n)        forget the last n positions of every row
    drop_front(n)    forget the first n positions of every row (they are padding in every row)
    select(rows)     keep only these batch rows, in this order (a row may appear twice)
    merge(other)     append other's rows after this one's; the one with fewer positions is first
                     left-padded with zeros to the other's length (the mask hides the zeros);
                     `other` (a cache of the same rank and backend) is not used afterwards

`ConcatCache` is the ONNX form: the cache is the tensors themselves, `present` = `past` ++ new,
handed from one step to the next by reference (a new array per step, made by the segment). Its
values may be numpy arrays or torch tensors (ONNX Runtime on CUDA, TensorRT).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from cqil.program import cache_entries, past_name, present_name


class KVCache(Protocol):
    length: int  # positions cached, left padding included

    def begin(self, env: dict) -> None: ...

    def end(self, env: dict, new: int) -> None: ...

    def rewind(self, n: int) -> None:
        """Forget the last `n` positions."""

    def drop_front(self, n: int) -> None:
        """Forget the first `n` positions (padding in every row)."""

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these batch rows, in this order."""

    def merge(self, other: "KVCache") -> None:
        """Append `other`'s rows; the shorter of the two is left-padded with zeros to the longer."""

    def arrays(self) -> dict[str, object]:
        """present name -> the cached keys/values [B, kv_heads, length, head_dim], for inspection."""


class ConcatCache:
    def __init__(self, layers, empty):
        """`empty`: a [B, kv_heads, 0, head_dim] array (numpy or torch) of the cache's dtype and device."""
        self.tensors = {entry: empty for entry in cache_entries(layers)}
        self.length = 0

    def begin(self, env: dict) -> None:
        for (layer, kind), value in self.tensors.items():
            env[past_name(layer, kind)] = value

    def end(self, env: dict, new: int) -> None:
        for layer, kind in self.tensors:
            self.tensors[layer, kind] = env[present_name(layer, kind)]
        self.length += new

    def rewind(self, n: int) -> None:
        self.length -= n
        for entry, value in self.tensors.items():
            self.tensors[entry] = value[:, :, :self.length]

    def drop_front(self, n: int) -> None:
        self.length -= n
        for entry, value in self.tensors.items():
            self.tensors[entry] = value[:, :, n:]

    def select(self, rows: Sequence[int]) -> None:
        rows = list(rows)
        for entry, value in self.tensors.items():
            self.tensors[entry] = value[rows]  # a copy, numpy and torch alike

    def merge(self, other: "ConcatCache") -> None:
        length = max(self.length, other.length)
        for entry, value in self.tensors.items():
            self.tensors[entry] = _concat([_pad_front(value, length - self.length),
                                           _pad_front(other.tensors[entry], length - other.length)], axis=0)
        self.length = length

    def arrays(self) -> dict[str, object]:
        return {present_name(layer, kind): value for (layer, kind), value in self.tensors.items()}


def _concat(values, axis: int):
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values, axis=axis)
    import torch

    return torch.cat(values, dim=axis)


def _pad_front(value, n: int):
    """`n` zero positions before the cached ones: [B, H, L, D] -> [B, H, n + L, D]."""
    if n == 0:
        return value
    B, H, _, D = value.shape
    zeros = np.zeros((B, H, n, D), value.dtype) if isinstance(value, np.ndarray) else value.new_zeros((B, H, n, D))
    return _concat([zeros, value], axis=2)
