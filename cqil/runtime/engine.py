"""Run an engine directory: one opened segment per ONNX file (ONNX Runtime by default), one thread per rank.

    engine = cqil.load("engine_dir")
    engine.generate([[1, 2, 3]], max_new_tokens=16)      # -> [[1, 2, 3, ...16 new tokens]]
    engine.logits(np.array([[1, 2, 3]]))                 # -> float32 [1, 3, vocab]

Each forward runs every rank's program (segments and collectives, from the manifest) at once:
rank 0 in the calling thread, ranks 1.. in a small thread pool (ONNX Runtime releases the GIL),
collectives in process (`LocalCollectives`). The KV cache lives per rank: `present.*` outputs become
the next step's `past_key_values.*` inputs by reference, never copied.

Elsewhere: ranks as processes (`cqil.runtime.launch` passes torch.distributed collectives in), the
torch (CUDA) and TensorRT segment backends (`cqil.runtime.backends`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cqil.compiler.config import ModelConfig
from cqil.errors import CqilError
from cqil.exporters.manifest import read_manifest
from cqil.schedule import Step
from cqil.plan import Plan
from cqil.runtime import backends
from cqil.runtime.sampling import check_sampling, sample

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
TOKENIZER_DEFINING = ("tokenizer.json", "tokenizer.model", "vocab.json")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


def load(engine_dir, **options) -> "Engine":
    """Open an engine directory; options as `Engine`."""
    return Engine(engine_dir, **options)


class Engine:
    """An opened engine directory.

    - `threads`: total intra-op threads (default: all cores), split evenly between the ranks held
      here, except that rank 0's outer-layer segments (run while the others wait) get them all
    - `verify`: check every file's sha256 against the manifest first
    - `backend`: "onnxruntime" (default), "torch" or "tensorrt"; see `cqil.runtime.backends`;
      other keyword options go to the backend (e.g. torch: `devices=["cuda:0", "cuda:1"]`)
    - `ranks`: the ranks this process runs (default all, as threads); with `collectives` (e.g.
      torch.distributed ones) one process per rank holds only its own rank's segments
    """

    def __init__(self, engine_dir, threads=None, verify=True, backend="onnxruntime", providers=None,
                 collective_timeout=600.0, ranks=None, collectives=None, **backend_options):
        self.dir = Path(engine_dir)
        self.manifest = read_manifest(self.dir, verify=verify)
        self.config = ModelConfig.from_dict(self.manifest["model"])
        self.plan = Plan.from_dict(self.manifest["plan"])
        self.max_seq_len = int(self.manifest["max_seq_len"])
        self.float_dtype = _NP_DTYPES.get(self.manifest["dtype"], np.float32)  # bfloat16: backends cast
        ranks_info = {r["rank"]: r for r in self.manifest["ranks"]}
        self.ranks = sorted(ranks_info) if ranks is None else sorted(ranks)
        if collectives is None and self.ranks != sorted(ranks_info):
            raise CqilError(f"engine: running ranks {self.ranks} of {sorted(ranks_info)} needs collectives "
                            f"that reach the other ranks (see cqil.runtime.launch)")
        threads = threads or os.cpu_count() or 1
        per_rank = max(1, threads // len(self.ranks))
        self.programs = {r: [Step.from_dict(s) for s in ranks_info[r]["program"]] for r in self.ranks}
        self.kv_layers = {r: ranks_info[r]["kv_layers"] for r in self.ranks}
        # tensor records by name, to size the buffers a rank receives into from another process
        self.tensors = {r: {t["name"]: t for s in ranks_info[r]["segments"] for t in s["inputs"]} for r in self.ranks}
        open_segment = backends.get(backend)
        # Rank 0's outer-layer segments run while every other rank waits (prefix before the broadcast,
        # suffix after the last all-reduce): they get all the threads, group segments a share each.
        def threads_for(rank, rec):
            alone = (rank == 0 and len(self.ranks) > 1 and not self.plan.replicate_outer and rec["layers"]
                     and not any(self.plan.in_range(l) for l in rec["layers"]))
            return threads if alone else per_rank

        self.segments = {r: {s["name"]: open_segment(self, r, s, threads=threads_for(r, s), providers=providers,
                                                       spin=len(self.ranks) == 1, **backend_options)
                             for s in ranks_info[r]["segments"]} for r in self.ranks}
        self._check_programs()
        self.collectives = collectives or backends.collectives(backend, self, collective_timeout)
        self._pool = ThreadPoolExecutor(len(self.ranks) - 1) if len(self.ranks) > 1 else None
        self.stats: dict = {}
        self._tokenizer = None

    # -- loading ------------------------------------------------------------------------------

    def _check_programs(self):
        """Every tensor a step reads must be a model input or produced by an earlier step."""
        for r, program in self.programs.items():
            have = set(MODEL_INPUTS) | {f"past_key_values.{l}.{k}" for l in self.kv_layers[r] for k in ("key", "value")}
            for step in program:
                if step.kind == "segment":
                    if step.segment not in self.segments[r]:
                        raise CqilError(f"engine: rank {r} program names unknown segment {step.segment!r}")
                    needs, makes = self.segments[r][step.segment].inputs, self.segments[r][step.segment].outputs
                    where = f"rank{r}/{step.segment}"
                else:
                    needs = step.inputs if (step.kind != "broadcast" or r == 0) else ()
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
            if not self.has_tokenizer:
                raise CqilError(f"engine: {self.dir} has no tokenizer files; pass token ids instead of text")
            from transformers import AutoTokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
            except Exception as e:  # missing sentencepiece, a broken tokenizer.json, ...
                raise CqilError(f"engine: cannot load the tokenizer in {self.dir}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return self._tokenizer

    def weight_bytes(self, rank: int) -> int:
        """Bytes of weights held by the loaded segments of `rank`."""
        return sum(s.weight_bytes for s in self.segments[rank].values())

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one forward pass ---------------------------------------------------------------------

    def new_cache(self, batch: int) -> dict[int, dict]:
        cfg = self.config
        empty = np.zeros((batch, cfg.num_kv_heads, 0, cfg.head_dim), self.float_dtype)
        return {r: {f"past_key_values.{l}.{k}": empty for l in self.kv_layers[r] for k in ("key", "value")}
                for r in self.ranks}

    def _run_rank(self, rank: int, env: dict) -> dict:
        segments = self.segments[rank]
        for step in self.programs[rank]:
            if step.kind == "segment":
                segments[step.segment](env)
                continue
            value = env[step.inputs[0]] if (step.kind != "broadcast" or rank == 0) else self._buffer(rank, step.outputs[0], env)
            result = self.collectives(rank, step.kind, value)
            if step.kind == "all_gather":
                env.update(zip(step.outputs, result))
            else:
                env[step.outputs[0]] = result
        return env

    def _buffer(self, rank: int, name: str, env: dict) -> np.ndarray:
        """An empty array shaped like tensor `name` of this step (from its manifest record)."""
        rec = self.tensors[rank][name]
        (B, T), total = env["input_ids"].shape, env["attention_mask"].shape[1]
        dims = {"batch": B, "sequence": T, "total_sequence": total, "past_sequence": total - T}
        return np.empty([dims.get(d, d) for d in rec["shape"]], _NP_DTYPES[rec["dtype"]])

    def forward(self, input_ids, attention_mask, position_ids, cache) -> np.ndarray:
        """One step for every rank; updates `cache` in place; returns logits [B, T, V]."""
        common = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        envs = {r: {**common, **cache[r]} for r in self.ranks}
        others = [self._pool.submit(self._run_rank, r, envs[r]) for r in self.ranks[1:]] if self._pool else []
        try:
            self._run_rank(self.ranks[0], envs[self.ranks[0]])
            for f in others:
                f.result()
        except BaseException:
            self.collectives.abort()
            for f in others:
                f.exception()  # wait for every rank to stop before the barrier is reused
            self.collectives.reset()
            raise
        for r in self.ranks:
            for name in cache[r]:
                cache[r][name] = envs[r]["present." + name.removeprefix("past_key_values.")]
        return envs[0]["logits"] if 0 in envs else None

    # -- user API -----------------------------------------------------------------------------

    def prepare(self, input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (list of lists, ragged allowed, or int array [B, T]) -> left-padded ids and mask."""
        if isinstance(input_ids, np.ndarray) or hasattr(input_ids, "numpy"):
            ids = np.asarray(input_ids)
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
                raise CqilError(f"input_ids must be integers of shape [batch, sequence], got {ids.dtype} {ids.shape}")
            ids = ids.astype(np.int64)
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
            if mask.shape != ids.shape:
                raise CqilError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        else:
            rows = list(input_ids)
            if rows and all(isinstance(x, (int, np.integer)) for x in rows):
                rows = [rows]  # a single sequence given flat
            try:
                rows = [list(r) for r in rows]
            except TypeError:
                raise CqilError("input_ids must be a list of token-id lists, or one flat list of ids") from None
            if not rows or any(len(r) == 0 for r in rows):
                raise CqilError("input_ids must hold at least one non-empty sequence")
            width = max(len(r) for r in rows)
            ids = np.zeros((len(rows), width), np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for i, r in enumerate(rows):
                try:
                    ids[i, width - len(r):] = np.asarray(r, dtype=np.int64)
                except (TypeError, ValueError):
                    raise CqilError(f"input_ids row {i} is not a list of integers") from None
                mask[i, width - len(r):] = 1
        if ids.size == 0:
            raise CqilError("input_ids is empty")
        vocab = self.config.vocab_size
        bad = ids[(mask == 1) & ((ids < 0) | (ids >= vocab))]
        if bad.size:
            raise CqilError(f"input ids outside the vocabulary [0, {vocab}): {sorted(set(bad.tolist()))[:5]}")
        if ids.shape[1] > self.max_seq_len:
            raise CqilError(f"prompt of {ids.shape[1]} tokens is longer than the engine's max_seq_len {self.max_seq_len}")
        return ids, mask

    @staticmethod
    def _last(logits):
        return None if logits is None else logits[:, -1]

    @staticmethod
    def positions(mask: np.ndarray) -> np.ndarray:
        return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Full-sequence logits [B, T, V] (float32) of a fresh prefill."""
        ids, mask = self.prepare(input_ids, attention_mask)
        out = self.forward(ids, mask, self.positions(mask), self.new_cache(ids.shape[0]))
        return None if out is None else out.astype(np.float32, copy=False)

    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, streamer=None, attention_mask=None) -> list[list[int]]:
        """Prompt + new tokens per sequence (padding removed). Stops a sequence at eos_token_id.

        `streamer`: an object with put(ids)/end() (transformers' streamers) or a callable; it gets
        the new token of every sequence, int64 [B], after each step.
        """
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise CqilError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids, mask = self.prepare(input_ids, attention_mask)
        B, T = ids.shape
        if T + max_new_tokens > self.max_seq_len:
            raise CqilError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                            f"max_seq_len {self.max_seq_len}")
        eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        rng = np.random.default_rng(seed)
        emit = streamer if callable(streamer) else getattr(streamer, "put", None)

        cache = self.new_cache(B)
        positions = self.positions(mask)
        t0 = time.perf_counter()
        logits = self._last(self.forward(ids, mask, positions, cache))
        t_prefill = time.perf_counter() - t0
        finished = np.zeros(B, bool)
        new = np.zeros((B, max_new_tokens), np.int64)
        steps = 0
        t1 = time.perf_counter()
        for i in range(max_new_tokens):
            # rank 0 chooses; with ranks in other processes, the collectives carry its choice to them
            chosen = sample(logits, do_sample, temperature, top_k, top_p, rng) if logits is not None else None
            token = np.where(finished, pad, self.collectives.share_tokens(chosen, B))
            new[:, i] = token
            steps = i + 1
            if emit is not None:
                emit(token)
            finished |= np.isin(token, list(eos)) if eos else False
            if finished.all() or i == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits = self._last(self.forward(token[:, None], mask, positions, cache))
        t_decode = time.perf_counter() - t1
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        self.stats = {"prefill_ms": 1000 * t_prefill, "new_tokens": steps,
                      "ms_per_token": 1000 * t_decode / max(steps - 1, 1) if steps > 1 else 0.0}
        out = []
        for b in range(B):
            seq = new[b, :steps].tolist()
            if eos:
                cut = next((j for j, t in enumerate(seq) if t in eos), None)
                seq = seq if cut is None else seq[:cut + 1]
            out.append(ids[b, mask[b, :T] == 1].tolist() + seq)
        return out
