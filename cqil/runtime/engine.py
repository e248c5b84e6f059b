"""Run an engine directory: every rank's program, one thread per rank, through a segment backend.

    engine = cqil.load("engine_dir")
    engine.generate([[1, 2, 3]], max_new_tokens=16)      # -> [[1, 2, 3, ...16 new tokens]]
    gen = engine.generator([[1, 2, 3]])                  # the decode state: see cqil.runtime.generator
    engine.logits(np.array([[1, 2, 3]]))                 # -> float32 [1, 3, vocab]

A forward runs every rank's program (segments and collectives, from the manifest) at once: rank 0
in the calling thread, ranks 1.. in a small thread pool (ONNX Runtime and torch release the GIL),
collectives in process (the backend's `local_collectives`), or, with `ranks=[r]` and
torch.distributed collectives, one rank per process (`cqil.runtime.launch`). Each rank's KV cache
is an object of its backend, owned by the Generator that uses it.

Threads: an Engine may be shared by threads. Forward passes are serialised (one lock): each
Generator keeps its own state, so concurrent `generate` / `logits` / Generator calls interleave
step by step and give the results they give alone. `stats` describes the calling thread's last
`generate` only when one thread generates at a time.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from cqil.errors import CqilError
from cqil.model.tokenizer import DEFINING as TOKENIZER_DEFINING
from cqil.model.tokenizer import load_tokenizer
from cqil.runtime import backends
from cqil.runtime.collectives import Abandoned
from cqil.runtime.generator import Generator, left_pad, positions_of
from cqil.runtime.spec import EngineSpec


def load(engine_dir, **options) -> "Engine":
    """Open an engine directory; options as `Engine`."""
    return Engine(engine_dir, **options)


class Engine:
    """An opened engine directory.

    - `threads`: total intra-op threads (default: all cores), split evenly between the ranks held
      here, except that rank 0's outer-layer segments (run while the others wait) get them all
    - `verify`: check every file's sha256 against the manifest first
    - `backend`: a name in `cqil.runtime.backends.BACKENDS` ("onnxruntime", "torch", "tensorrt");
      other keyword options go to it (e.g. torch: `devices=["cuda:0", "cuda:1"]`) and must be ones
      it takes
    - `ranks`: the ranks this process runs (default all, as threads); with `collectives` (e.g.
      torch.distributed ones) one process per rank holds only its own rank's segments
    """

    def __init__(self, engine_dir, threads=None, verify=True, backend="onnxruntime", collective_timeout=600.0,
                 ranks=None, collectives=None, **backend_options):
        self.spec = spec = EngineSpec.read(engine_dir, verify=verify)
        self.dir, self.manifest, self.config, self.plan = spec.dir, spec.manifest, spec.config, spec.plan
        self.max_seq_len, self.programs = spec.max_seq_len, spec.programs
        self.ranks = spec.ranks if ranks is None else sorted(ranks)
        if collectives is None and self.ranks != spec.ranks:
            raise CqilError(f"engine: running ranks {self.ranks} of {spec.ranks} needs collectives "
                            f"that reach the other ranks (see cqil.runtime.launch)")
        self.has_logits = 0 in self.ranks
        self.backend = backend
        threads = threads or os.cpu_count() or 1
        per_rank = max(1, threads // len(self.ranks))

        # Rank 0's outer-layer segments run while every other rank waits (prefix before the broadcast,
        # suffix after the last all-reduce): they get all the threads, group segments a share each.
        def threads_for(rank: int, rec: dict) -> int:
            alone = (rank == 0 and len(self.ranks) > 1 and not self.plan.replicate_outer and rec["layers"]
                     and not any(self.plan.in_range(l) for l in rec["layers"]))
            return threads if alone else per_rank

        self.runners = backends.open_ranks(backend, spec, self.ranks, threads_for, backend_options)
        self.segments = {r: runner.segments for r, runner in self.runners.items()}
        try:
            self._check_programs()
            self.collectives = collectives or backends.local_collectives(backend, self.runners, collective_timeout)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(len(self.ranks) - 1) if len(self.ranks) > 1 else None
        self._lock = threading.Lock()
        self.collective_timeout = collective_timeout
        self._broken: str | None = None
        self.stats: dict = {}
        self._tokenizer = None

    # -- loading ------------------------------------------------------------------------------

    def _check_programs(self):
        """Every tensor a step reads must be a model input or produced by an earlier step."""
        for r in self.ranks:
            have = self.spec.rank_inputs(r)
            for step in self.programs[r]:
                if step.kind == "segment":
                    if step.segment not in self.segments[r]:
                        raise CqilError(f"engine: rank {r} program names unknown segment {step.segment!r}")
                    needs, makes = self.segments[r][step.segment].inputs, self.segments[r][step.segment].outputs
                    where = f"rank{r}/{step.segment}"
                else:
                    needs = step.inputs if step.sends(r) else ()
                    makes, where = step.outputs, f"rank {r} {step.kind}"
                missing = [n for n in needs if n not in have]
                if missing:
                    raise CqilError(f"engine: {where} needs unknown tensor name(s) {missing}: no earlier step produces them")
                have.update(makes)
            if r == 0 and "logits" not in have:
                raise CqilError("engine: rank 0 never produces logits")

    @property
    def has_tokenizer(self) -> bool:
        """Whether the engine directory holds a tokenizer (generation_config.json alone is not one)."""
        return any(f in TOKENIZER_DEFINING for f in self.manifest.get("tokenizer_files", ()))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.dir, what="engine")
        return self._tokenizer

    def weight_bytes(self, rank: int) -> int:
        """Bytes of weights held by the loaded segments of `rank`."""
        return sum(s.weight_bytes for s in self.segments[rank].values())

    def close(self):
        """Stop the rank threads and release every rank's sessions, weights and device memory."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=not getattr(self, "_broken", None))  # a hung rank thread never ends
            self._pool = None
        for runner in getattr(self, "runners", {}).values():
            runner.close()
        self.runners, self.segments = {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one forward pass ---------------------------------------------------------------------

    def new_cache(self, batch: int) -> dict:
        """A fresh KV cache of every rank held here: {rank: KVCache}."""
        self._check_open()
        return {r: self.runners[r].new_cache(batch) for r in self.ranks}

    def _check_open(self):
        if not self.runners:
            raise CqilError("engine: it is closed")
        if self._broken:
            raise CqilError(f"engine: unusable since {self._broken}; open it again")

    def _run_rank(self, rank: int, env: dict) -> dict:
        segments = self.segments[rank]
        for step in self.programs[rank]:
            if step.kind == "segment":
                segments[step.segment](env)
                continue
            value = env[step.inputs[0]] if step.sends(rank) else self._buffer(rank, step.outputs[0], env)
            result = self.collectives(rank, step.kind, value)
            if step.kind == "all_gather":
                env.update(zip(step.outputs, result))
            else:
                env[step.outputs[0]] = result
        return env

    def _buffer(self, rank: int, name: str, env: dict):
        """An empty value shaped like tensor `name` of this step (from its manifest record), for a
        broadcast to receive into from another process."""
        rec = self.spec.tensor(rank, name)
        (B, T), total = env["input_ids"].shape, env["attention_mask"].shape[1]
        dims = {"batch": B, "sequence": T, "total_sequence": total, "past_sequence": total - T}
        return self.runners[rank].empty([dims.get(d, d) for d in rec["shape"]], rec["dtype"])

    def forward(self, input_ids, attention_mask, position_ids, cache) -> np.ndarray | None:
        """One step for every rank; extends `cache` (from `new_cache`); returns logits [B, T, V]
        (None in a process that does not hold rank 0)."""
        common = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        with self._lock:
            self._check_open()
            envs = {}
            for r in self.ranks:
                envs[r] = dict(common)
                cache[r].begin(envs[r])
            self._run_ranks(envs)
            for r in self.ranks:
                cache[r].end(envs[r], input_ids.shape[1])
        return envs[0]["logits"] if 0 in envs else None

    def _run_ranks(self, envs: dict):
        """Every rank's program at once; the first rank to fail stops the others and is reported."""
        others = {r: self._pool.submit(self._run_rank_or_abort, r, envs[r]) for r in self.ranks[1:]}
        errors = {}
        try:
            self._run_rank_or_abort(self.ranks[0], envs[self.ranks[0]])
        except BaseException as e:
            errors[self.ranks[0]] = e
        for r, f in others.items():
            try:
                e = f.exception(timeout=self.collective_timeout)
            except FutureTimeout:  # a rank stuck inside a segment: its thread cannot be stopped
                self._broken = f"rank {r} hangs inside a segment (no answer for {self.collective_timeout:g} s)"
                e = Abandoned(self._broken)
            if e is not None:
                errors[r] = e
        if errors:
            self.collectives.reset()
            raise _cause(errors)

    def _run_rank_or_abort(self, rank: int, env: dict):
        try:
            self._run_rank(rank, env)
        except BaseException:
            self.collectives.abort(rank)  # the ranks waiting for this one stop now, not at the timeout
            raise

    # -- user API -----------------------------------------------------------------------------

    def prepare(self, input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (list of lists, ragged allowed, or int array [B, T]) -> left-padded ids and mask."""
        ids, mask = left_pad(input_ids, attention_mask, self.config.vocab_size)
        if ids.shape[1] > self.max_seq_len:
            raise CqilError(f"prompt of {ids.shape[1]} tokens is longer than the engine's max_seq_len {self.max_seq_len}")
        return ids, mask

    positions = staticmethod(positions_of)

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Full-sequence logits [B, T, V] (float32) of a fresh prefill."""
        ids, mask = self.prepare(input_ids, attention_mask)
        out = self.forward(ids, mask, self.positions(mask), self.new_cache(ids.shape[0]))
        return None if out is None else out.astype(np.float32, copy=False)

    def generator(self, input_ids, attention_mask=None, **options) -> Generator:
        """A Generator over this engine, its prompt already fed; options as `Generator`."""
        return Generator(self, input_ids, attention_mask, **options)

    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, streamer=None, attention_mask=None) -> list[list[int]]:
        """Prompt + new tokens per sequence (padding removed). Stops a sequence at eos_token_id.

        `streamer`: an object with put(ids)/end() (transformers' streamers) or a callable; it gets
        the new token of every sequence, int64 [B], after each step.
        """
        if max_new_tokens < 1:
            raise CqilError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        emit = streamer if callable(streamer) else getattr(streamer, "put", None)
        t0 = time.perf_counter()
        gen = self.generator(input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed)
        t1 = time.perf_counter()
        while not gen.done:
            token = gen.next_tokens()
            if emit is not None:
                emit(token)
        t_decode = time.perf_counter() - t1
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        steps = gen.new_tokens
        self.stats = {"prefill_ms": 1000 * (t1 - t0), "new_tokens": steps,
                      "ms_per_token": 1000 * t_decode / max(steps - 1, 1) if steps > 1 else 0.0}
        return gen.tokens

    # -- text (cqil.runtime.completion, cqil.runtime.chat) ---------------------------------------

    @property
    def generation_defaults(self):
        """Sampling defaults (a SamplingParams): generation_config.json's keys over OpenAI's."""
        from cqil.runtime.completion import default_params

        return default_params(self)

    def complete(self, prompt, **params):
        """Text in, text out: `prompt` a string (-> a string; n > 1: a list of n) or a list of them (->
        a list of those). `params`: SamplingParams fields (temperature 0 = greedy, top_p, top_k, min_p,
        repetition/presence/frequency_penalty, max_tokens (default 16), stop, stop_token_ids, n, seed)."""
        from cqil.runtime.completion import complete

        return complete(self, prompt, **params)

    def chat(self, messages, **params) -> str:
        """The assistant's reply to `messages` ([{"role", "content"}]) under the engine's chat template."""
        return self.start_chat(messages, **params).respond()

    def start_chat(self, messages=(), system: str | None = None, **params):
        """A conversation (cqil.runtime.chat.Chat) that keeps its KV cache from turn to turn."""
        from cqil.runtime.chat import Chat

        return Chat(self, messages, system=system, **params)


def _cause(errors: dict[int, BaseException]) -> BaseException:
    """The error to report for a failed step: an interrupt as is; else the first rank's own error
    (not a victim's `Abandoned`), named by its rank; else the first victim's, which names who hung."""
    for e in errors.values():
        if not isinstance(e, Exception):  # KeyboardInterrupt, a stop signal
            return e
    own = {r: e for r, e in errors.items() if not isinstance(e, Abandoned)}
    rank, e = next(iter(sorted(own.items()) or sorted(errors.items())))
    if not isinstance(e, CqilError):
        e.add_note(f"(on rank {rank})")
        return e
    message = str(e)
    return e if message.startswith(f"rank {rank}") else CqilError(f"rank {rank}: {message}")
