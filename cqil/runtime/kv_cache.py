"""A rank's KV cache for one Generator: the protocol every backend's cache follows, and the plain one.

The Engine runs a step as

    cache.begin(env)          # the rank's past keys/values (or whatever the backend needs) into env
    ... the rank's program ...
    cache.end(env, new)       # keep this step's presents; `new` tokens were added

Each Generator owns one cache per rank, so several generators on one engine never share KV state.

`ConcatCache` is the ONNX form: the cache is the tensors themselves, `present` = `past` ++ new,
handed from one step to the next by reference (a new array per step, made by the segment).
"""

from __future__ import annotations

from typing import Protocol

from cqil.program import cache_entries, past_name, present_name


class KVCache(Protocol):
    length: int  # positions cached, left padding included

    def begin(self, env: dict) -> None: ...

    def end(self, env: dict, new: int) -> None: ...

    def rewind(self, n: int) -> None:
        """Forget the last `n` positions."""

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

    def arrays(self) -> dict[str, object]:
        return {present_name(layer, kind): value for (layer, kind), value in self.tensors.items()}
