"""Helpers shared by the engine tests (test_engine*.py, test_cli_run_check.py): compile quietly, run
the PyTorch reference of a plan, greedy loops, a tiny byte-level tokenizer, one-line CLI errors.

The reference loops here are written out on purpose instead of reusing `cqil.verify`, so
that the tests do not check cqil-check's code with itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import cqil
from cqil.cli_util import run_main
from cqil.model.loader import load_model
from cqil.passes import build_graph
from cqil.plan import Plan

ATOL = 1e-4
STEPS = 32
STD = 0.1  # wide init, so that logits are far from uniform and every layer moves them


def compile_engine(model_dir, out_dir, **options) -> Path:
    return cqil.compile(model_dir, out_dir, progress=False, log=lambda msg: None, **options)


def open_engine(engine_dir, **options):
    return cqil.load(engine_dir, threads=1, **options)


def reference(model_dir, plan: Plan | dict, dtype: str = "float32"):
    """(model, gm): the checkpoint as the CQIL GraphModule of `plan`."""
    model = load_model(model_dir, dtype=dtype)
    return model, build_graph(model, plan if isinstance(plan, Plan) else Plan.from_dict(plan))


def reference_logits(model, gm, ids: np.ndarray) -> np.ndarray:
    B, T = ids.shape
    with torch.no_grad():
        logits, _ = gm(torch.from_numpy(ids), torch.ones(B, T, dtype=torch.long), torch.arange(T).expand(B, T),
                       model.empty_cache(B))
    return logits.float().numpy()


def reference_greedy(model, gm, ids: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """Greedy tokens [B, steps] of the reference, decoding one token at a time with its KV cache."""
    B, T = ids.shape
    x = torch.from_numpy(ids)
    past = model.empty_cache(B)
    mask, pos = torch.ones(B, T, dtype=torch.long), torch.arange(T).expand(B, T)
    tokens = []
    with torch.no_grad():
        for i in range(steps):
            logits, past = gm(x, mask, pos, past)
            x = logits[:, -1:].argmax(-1)  # [B, 1]
            tokens.append(x)
            mask = torch.ones(B, T + i + 1, dtype=torch.long)
            pos = torch.full((B, 1), T + i)
    return torch.cat(tokens, 1).numpy()


def new_tokens(engine, ids, steps: int = STEPS) -> np.ndarray:
    """The engine's greedy tokens [B, steps] (no eos: always `steps` of them)."""
    out = engine.generate(ids, max_new_tokens=steps)
    return np.array([row[-steps:] for row in out])


def max_diff(a, b) -> float:
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def cli(prog: str, main, argv, capsys) -> tuple[int, str, str]:
    """Run a command line in process, as its console script does -> (exit code, stdout, stderr)."""
    code = run_main(prog, main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str, expected_code: int = 2):
    assert code == expected_code, f"exit {code}, stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err and "internal error" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"


# -- a tiny byte-level BPE tokenizer ------------------------------------------------------------

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bakers "
         "in old towns near rivers and mountains café naïve").split()
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny checkpoints' bos 1 and eos 2
TOKENIZER_VOCAB = 300  # 3 specials + 256 bytes + merges; checkpoints using it need vocab_size=300


def write_tokenizer(folder: Path) -> Path:
    """tokenizer.json + tokenizer_config.json in `folder` ("€" is left out of the merges on purpose:
    it stays three byte tokens, a character that spans several tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() <= TOKENIZER_VOCAB
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder
