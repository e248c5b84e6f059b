"""Decode state of one batch: the one decode loop of cqil.

    gen = engine.generator([[1, 2, 3], [4, 5]], max_new_tokens=16, eos_token_id=2)
    while not gen.done:
        token = gen.next_tokens()          # int64 [B]: chosen from gen.logits, fed on the next call
    gen.tokens                              # per row: prompt + new tokens (up to its eos), no padding
    gen.append_tokens([[7, 8]])             # continue the conversation: no new prefill
    gen.rewind(3)                           # forget the last 3 positions

The batch shares one sequence axis. Ragged prompts (and ragged appends) are left-padded with
attention-mask zeros; position ids count real tokens only (`cumsum(mask) - 1`), so a row's
padding never shifts its positions. A chosen token is fed to the model lazily, by the next
`next_tokens()` or `append_tokens()`, so the last token of a generation costs no forward. Once a
row emits an eos id it is finished: it keeps receiving `pad_token_id`, fed with mask 0, so its
history stays prompt + generated + eos. `append_tokens` starts a new turn: every row is unfinished
again and `max_new_tokens` counts anew.

Every row samples on its own (`params`: a `SamplingParams` per row, see cqil.runtime.sampling): its
own random generator, penalties over its own tokens, its own `max_tokens`, stop token ids and
logprobs; `finish_reasons` says why each row ended ("stop" or "length").

Continuous batching (cqil.serve drives it): rows join and leave between steps.

    running.merge(Generator(engine, new_prompts, params=...))   # prefilled on their own, then joined
    running.select(rows_still_running)                           # the others leave

A joining batch is left-padded to the longer sequence axis (padding may then sit in the middle of
a row's history, which the mask and the positions make harmless); leaving rows are sliced out of
the KV caches and columns that became padding in every row are dropped from the front. A row's
logits thus agree with those it gets alone up to rounding, and its greedy tokens are the same,
whatever joins or leaves beside it (tests/test_batching.py).

A Generator owns its KV cache (one per rank), so any number of them may live on one engine; the
engine serialises their steps (see `Engine`).
"""

from __future__ import annotations

import numpy as np

from cqil.errors import CqilError
from cqil.runtime.sampling import SamplingParams, TokenLogprob, choose, legacy_params, logprobs_of


def left_pad(input_ids, attention_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (list of lists, ragged allowed, one flat list, or int array [B, T]) -> left-padded
    int64 ids and mask [B, T]. Ids must be integers in [0, vocab_size) (no floats, strings or bools
    coerced), a mask holds 0s and 1s only, and every row at least one real token."""
    if isinstance(input_ids, np.ndarray) or hasattr(input_ids, "numpy"):
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise CqilError(f"input_ids must be integers of shape [batch, sequence], got {ids.dtype} {ids.shape}")
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else _mask(attention_mask, ids.shape)
        real = ids[mask == 1]
        bad = real[(real < 0) | (real >= vocab_size)]
        ids = np.where(mask == 1, ids, 0).astype(np.int64)
    else:
        if attention_mask is not None:
            raise CqilError("attention_mask goes with an array of input_ids; lists of ids are left-padded by cqil")
        if isinstance(input_ids, (str, bytes)) or not hasattr(input_ids, "__iter__"):
            raise CqilError(f"input_ids must be a list of token-id lists, or one flat list of ids, got {input_ids!r:.40}")
        rows = list(input_ids)
        if rows and not any(isinstance(x, (list, tuple, np.ndarray)) for x in rows):
            rows = [rows]  # a single sequence given flat
        try:
            rows = [list(r) for r in rows]
        except TypeError:
            raise CqilError("input_ids must be a list of token-id lists, or one flat list of ids") from None
        if not rows or any(len(r) == 0 for r in rows):
            raise CqilError("input_ids must hold at least one non-empty sequence")
        for i, r in enumerate(rows):
            wrong = [x for x in r if not _is_id(x)]
            if wrong:
                raise CqilError(f"input_ids row {i} holds {wrong[0]!r}, which is not an integer token id")
        bad = np.array([x for r in rows for x in r if not 0 <= int(x) < vocab_size], dtype=object)
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        if not bad.size:
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = np.asarray(r, dtype=np.int64)
                mask[i, width - len(r):] = 1
    if bad.size:
        raise CqilError(f"input ids outside the vocabulary [0, {vocab_size}): {sorted(set(bad.tolist()))[:5]}")
    if ids.size == 0:
        raise CqilError("input_ids is empty")
    return ids, mask


def _is_id(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _mask(attention_mask, shape) -> np.ndarray:
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise CqilError(f"attention_mask shape {mask.shape} differs from input_ids shape {shape}")
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise CqilError(f"attention_mask must hold only 0 (padding) and 1 (token), got values "
                        f"{sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]}")
    mask = mask.astype(np.int64)
    if mask.size and not mask.any(axis=1).all():
        raise CqilError(f"attention_mask row(s) {np.flatnonzero(~mask.any(axis=1)).tolist()[:5]} hold no token")
    return mask


def positions_of(mask: np.ndarray) -> np.ndarray:
    """Position ids [B, S] of a mask: real tokens count 0, 1, 2, ...; padding repeats its neighbour."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


class Generator:
    """The decode state of a batch (see the module docstring).

    Sampling is per row: `params` is one `SamplingParams` for every row or a list of one per row
    (`max_tokens`, `stop_token_ids`, `ignore_eos`, `logprobs` and `seed` included); the older
    keywords `do_sample`, `temperature`, `top_k`, `top_p`, `seed` describe one for every row.
    `max_new_tokens` is the default of a row's `max_tokens`.
    """

    def __init__(self, engine, input_ids, attention_mask=None, *, max_new_tokens: int | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None):
        legacy = legacy_params(do_sample, temperature, top_k, top_p, seed)
        if params is not None and legacy != legacy_params():
            raise CqilError("give the sampling as `params` or as do_sample/temperature/top_k/top_p/seed, not both")
        self.engine = engine
        ids, mask = engine.prepare(input_ids, attention_mask)
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise CqilError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            if ids.shape[1] + max_new_tokens > engine.max_seq_len:
                raise CqilError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                                f"max_seq_len {engine.max_seq_len}")
        self.max_new_tokens = max_new_tokens
        self.eos = sorted(set(np.atleast_1d(eos_token_id).tolist())) if eos_token_id is not None else []
        self.pad = pad_token_id if pad_token_id is not None else (min(self.eos) if self.eos else 0)
        self.batch = ids.shape[0]
        self._rows = [_Row(p, engine, self.eos, max_new_tokens, offset)
                      for p, offset in _per_row(legacy if params is None else params, self.batch)]
        longest = max((r.limit for r in self._rows if r.limit is not None), default=0)
        if ids.shape[1] + longest > engine.max_seq_len:
            raise CqilError(f"prompt ({ids.shape[1]} positions) + max_tokens ({longest}) exceeds the engine's "
                            f"max_seq_len {engine.max_seq_len}")
        self.cache = engine.new_cache(self.batch)
        self._ids = np.zeros((self.batch, 0), np.int64)  # every fed position, padding included
        self._mask = np.zeros((self.batch, 0), np.int64)
        self._pending: np.ndarray | None = None  # chosen tokens [B] not yet fed, and their mask
        self._pending_mask: np.ndarray | None = None
        self.finished = np.zeros(self.batch, bool)
        self.new_tokens = 0  # next_tokens calls in this turn
        self.logits: np.ndarray | None = None  # [B, V] after the last fed position; None on ranks != 0
        self._feed(ids, mask)

    # -- state --------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Positions in the sequence, padding and a chosen-but-not-fed token included."""
        return self._mask.shape[1] + (self._pending is not None)

    @property
    def cached(self) -> int:
        """Positions the model has seen (in the KV caches): `length` without a chosen-but-not-fed token."""
        return self._mask.shape[1]

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or self.length >= self.engine.max_seq_len

    @property
    def tokens(self) -> list[list[int]]:
        """Per row: every real token so far (prompt, appended and generated), padding removed."""
        return [self._row_tokens(b) for b in range(self.batch)]

    @property
    def finish_reasons(self) -> list[str | None]:
        """Per row: None while it runs, "stop" (an eos or stop token id, or `finish`), "length"."""
        return [r.finish_reason for r in self._rows]

    @property
    def token_logprobs(self) -> list[TokenLogprob | None]:
        """Per row: the logprobs of the token the last `next_tokens` chose, for rows that asked for them."""
        return [r.logprob for r in self._rows]

    def _row_tokens(self, b: int) -> list[int]:
        row = self._ids[b, self._mask[b] == 1].tolist()
        if self._pending is not None and self._pending_mask[b]:
            row.append(int(self._pending[b]))
        return row

    # -- steps --------------------------------------------------------------------------------

    def _feed(self, ids: np.ndarray, mask: np.ndarray):
        """Run the model on new positions ids/mask [B, n]; logits become those after the last one."""
        if self._mask.shape[1] + ids.shape[1] > self.engine.max_seq_len:
            raise CqilError(f"the sequence would reach {self._mask.shape[1] + ids.shape[1]} positions, more than the "
                            f"engine's max_seq_len {self.engine.max_seq_len}")
        full = np.concatenate([self._mask, mask], axis=1)
        positions = positions_of(full)[:, -ids.shape[1]:]
        logits = self.engine.forward(ids, full, positions, self.cache)
        self._ids = np.concatenate([self._ids, ids], axis=1)
        self._mask = full
        self.logits = None if logits is None else logits[:, -1]

    def flush(self):
        """Feed the chosen tokens, if any, to the model (next_tokens and append_tokens do it anyway)."""
        if self._pending is not None:
            pending, mask = self._pending, self._pending_mask
            self._pending = self._pending_mask = None
            self._feed(pending[:, None], mask[:, None])

    def next_tokens(self) -> np.ndarray:
        """Choose the next token of every row (int64 [B]); finished rows get the pad id."""
        if self.done:
            raise CqilError("the generator is done: append tokens to continue")
        self.flush()
        if self.logits is None and self.engine.has_logits:
            raise CqilError("no logits to choose from after a rewind: append tokens first")
        live = ~self.finished
        # rank 0 chooses; with ranks in other processes, the collectives carry its choice to them
        chosen = self._choose(live) if self.logits is not None else None
        token = np.where(self.finished, self.pad, self.engine.collectives.share_tokens(chosen, self.batch))
        self._pending, self._pending_mask = token, live.astype(np.int64)
        for b in np.flatnonzero(live):
            reason = self._rows[b].took(int(token[b]))
            if reason:
                self.finish([b], reason)
        self.new_tokens += 1
        if self.length >= self.engine.max_seq_len:
            self.finish(np.flatnonzero(~self.finished), "length")
        return token

    def _choose(self, live: np.ndarray) -> np.ndarray:
        rows, logits = self._rows, self.logits
        if all(r.params.plain_greedy for r in rows):
            chosen = logits.argmax(-1).astype(np.int64)
        else:
            chosen = np.zeros(self.batch, np.int64)
            for b in np.flatnonzero(live):
                r = rows[b]
                context = self._row_tokens(b) if r.params.repetition_penalty != 1 else ()
                chosen[b] = choose(logits[b], r.params, context, r.output, r.rng)
        for b, r in enumerate(rows):
            r.logprob = (logprobs_of(logits[b], chosen[b], r.params.logprobs)
                         if live[b] and r.params.logprobs is not None else None)
        return chosen

    def finish(self, rows, reason: str = "stop"):
        """End these rows now (a stop string was seen, say): from the next step on they get padding."""
        for b in rows:
            if not self.finished[b]:
                self.finished[b] = True
                self._rows[b].finish_reason = reason

    def append_tokens(self, input_ids, attention_mask=None, params=None):
        """Feed more tokens to every row (a new user turn); ragged rows are left-padded within the chunk.
        Every row runs again, with `params` (one, or one per row) if given, and counts its tokens anew."""
        ids, mask = left_pad(input_ids, attention_mask, self.engine.config.vocab_size)
        if ids.shape[0] != self.batch:
            raise CqilError(f"append_tokens: got {ids.shape[0]} row(s), the generator has {self.batch}")
        rows = self._rows if params is None else [_Row(p, self.engine, self.eos, self.max_new_tokens, offset)
                                                  for p, offset in _per_row(params, self.batch)]
        if self._pending is not None:
            ids = np.concatenate([self._pending[:, None], ids], axis=1)
            mask = np.concatenate([self._pending_mask[:, None], mask], axis=1)
            self._pending = self._pending_mask = None
        self._feed(ids, mask)
        self._rows = [r.new_turn() for r in rows]
        self.finished[:] = False
        self.new_tokens = 0

    def rewind(self, n: int):
        """Forget the last `n` positions (a chosen token counts as one); append tokens before choosing again."""
        if not 0 <= n <= self.length:
            raise CqilError(f"rewind: n must be in [0, {self.length}], got {n}")
        if n and self._pending is not None:
            self._pending = self._pending_mask = None
            n -= 1
        if n:
            self._ids, self._mask = self._ids[:, :-n], self._mask[:, :-n]
            for cache in self.cache.values():
                cache.rewind(n)
            self.logits = None

    # -- continuous batching: rows join and leave at a step boundary ----------------------------

    def merge(self, other: "Generator"):
        """Take `other`'s rows (its prompts already fed) into this batch, after this one's rows.

        Both feed their chosen tokens first, so the merged batch has logits for every row and chooses
        next. The shorter sequence axis is left-padded (mask 0; positions count real tokens only, so
        a row's outputs do not change). `other` is used up. Ranks in one process only."""
        if other is self or other.engine is not self.engine:
            raise CqilError("merge: the other generator must be another one on the same engine")
        self.flush()
        other.flush()
        if self.engine.has_logits and (self.logits is None or other.logits is None):
            raise CqilError("merge: a generator after a rewind has no logits: append tokens first")
        width = max(self._mask.shape[1], other._mask.shape[1])
        ids, mask = [], []
        for g in (self, other):
            pad = width - g._mask.shape[1]
            ids.append(np.pad(g._ids, ((0, 0), (pad, 0))))
            mask.append(np.pad(g._mask, ((0, 0), (pad, 0))))
        for rank, cache in self.cache.items():
            cache.merge(other.cache[rank])
        self._ids, self._mask = np.concatenate(ids), np.concatenate(mask)
        if self.logits is not None:
            self.logits = np.concatenate([self.logits, other.logits])
        self.finished = np.concatenate([self.finished, other.finished])
        self._rows += other._rows
        self.batch += other.batch
        other.cache, other._rows, other.batch = {}, [], 0

    def select(self, rows):
        """Keep only these rows, in this order (finished rows leave the batch); columns that are
        padding in every remaining row are dropped from the front of the sequence axis."""
        rows = [int(b) for b in rows]
        if not rows or any(not 0 <= b < self.batch for b in rows):
            raise CqilError(f"select: rows must be a non-empty list of row numbers below {self.batch}, got {rows}")
        for cache in self.cache.values():
            cache.select(rows)
        self._ids, self._mask = self._ids[rows], self._mask[rows]
        if self._pending is not None:
            self._pending, self._pending_mask = self._pending[rows], self._pending_mask[rows]
        if self.logits is not None:
            self.logits = self.logits[rows]
        self.finished = self.finished[rows]
        self._rows = [self._rows[b] for b in rows]
        self.batch = len(rows)
        empty = int(np.argmax(self._mask.any(axis=0))) if self._mask.any() else self._mask.shape[1]
        if empty:
            for cache in self.cache.values():
                cache.drop_front(empty)
            self._ids, self._mask = self._ids[:, empty:], self._mask[:, empty:]


def _per_row(params, batch: int):
    """(params, seed offset) of every row: one SamplingParams for all rows, or a list of one per row."""
    if isinstance(params, SamplingParams):
        return [(params, b) for b in range(batch)]
    params = list(params)
    if len(params) != batch or not all(isinstance(p, SamplingParams) for p in params):
        raise CqilError(f"params must be one SamplingParams or a list of {batch} (one per row)")
    return [(p, 0) for p in params]


class _Row:
    """What a Generator keeps of one row besides its tokens: sampling, limit, this turn's output."""

    def __init__(self, params: SamplingParams, engine, eos, max_new_tokens, seed_offset: int):
        self.params = params
        self.limit = params.max_tokens if params.max_tokens is not None else max_new_tokens
        vocab = engine.config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise CqilError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos))
        self.rng = params.rng(seed_offset)
        self.output: list[int] = []  # tokens chosen in this turn
        self.finish_reason: str | None = None
        self.logprob: TokenLogprob | None = None

    def took(self, token: int) -> str | None:
        """Record a chosen token; the reason the row ends with it, if it does."""
        self.output.append(token)
        if token in self.stop_ids:
            return "stop"
        if self.limit is not None and len(self.output) >= self.limit:
            return "length"
        return None

    def new_turn(self) -> "_Row":
        self.output, self.finish_reason, self.logprob = [], None, None
        return self
