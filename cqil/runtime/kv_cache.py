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

`BufferCache` is one preallocated buffer per layer and kind, [B, kv_heads, capacity, head_dim],
that a segment reads and writes in place (ONNX Runtime's GroupQueryAttention with past and present
bound to the same buffer): a decode step writes one position instead of copying the cache. The
capacity grows in powers of two as the sequence does (a copy then, rarely), up to the engine's
max_seq_len; positions past `length` are scratch.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from cqil.errors import CqilError
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


class BufferCache:
    def __init__(self, layers, batch: int, zeros, max_capacity: int, spare: int = 0, min_capacity: int = 256):
        """`zeros(batch, capacity)` makes one zeroed buffer [batch, kv_heads, capacity, head_dim] (numpy or
        torch, of the cache's dtype and device); `spare` positions beyond the sequence are kept free."""
        self.entries = cache_entries(layers)
        self.batch, self.zeros, self.spare = batch, zeros, spare
        self.max_capacity, self.min_capacity = max_capacity + spare, min_capacity
        self.length, self.capacity = 0, 0
        self.buffers: dict[tuple[int, str], object] = {}

    def _resize(self, capacity: int):
        new = {}
        for entry in self.entries:
            buf = self.zeros(self.batch, capacity)
            if self.length:
                buf[:, :, :self.length] = self.buffers[entry][:, :, :self.length]
            new[entry] = buf
        self.buffers, self.capacity = new, capacity

    def begin(self, env: dict) -> None:
        B, T = env["input_ids"].shape
        total = env["attention_mask"].shape[1]
        if B != self.batch or total - T != self.length:
            raise CqilError(f"KV cache: a step of batch {B} after {total - T} positions, but the cache holds "
                            f"batch {self.batch} with {self.length}")
        if total + self.spare > self.capacity:
            capacity = max(self.min_capacity, self.capacity)
            while capacity < total + self.spare:
                capacity *= 2
            self._resize(min(capacity, self.max_capacity))
        for (layer, kind), buf in self.buffers.items():
            env[past_name(layer, kind)] = buf

    def end(self, env: dict, new: int) -> None:
        self.length += new

    def rewind(self, n: int) -> None:
        self.length -= n  # positions past the length are overwritten before anything reads them

    def drop_front(self, n: int) -> None:
        for buf in self.buffers.values():
            buf[:, :, :self.length - n] = _copy(buf[:, :, n:self.length])  # the ranges overlap
        self.length -= n

    def select(self, rows: Sequence[int]) -> None:
        rows = list(rows)
        self.buffers = {entry: _copy(buf[rows]) for entry, buf in self.buffers.items()}
        self.batch = len(rows)

    def merge(self, other: "BufferCache") -> None:
        length, capacity = max(self.length, other.length), max(self.capacity, other.capacity)
        new = {}
        for entry in self.entries:
            buf = self.zeros(self.batch + other.batch, capacity)
            for rows, cache in ((slice(0, self.batch), self), (slice(self.batch, None), other)):
                if cache.length:  # right-aligned: the shorter one gets zeros in front (the mask hides them)
                    buf[rows, :, length - cache.length:length] = cache.buffers[entry][:, :, :cache.length]
            new[entry] = buf
        self.buffers, self.batch, self.length, self.capacity = new, self.batch + other.batch, length, capacity

    def arrays(self) -> dict[str, object]:
        return {present_name(layer, kind): buf[:, :, :self.length] for (layer, kind), buf in self.buffers.items()}


def _copy(value):
    return value.copy() if isinstance(value, np.ndarray) else value.clone()


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
