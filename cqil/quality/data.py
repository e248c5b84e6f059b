"""Held-out and training text: read a plain-text file, tokenize it with the model's own tokenizer.

Every quality tool reads its data here, so a missing, empty or binary `--data` file gives the same
one-line error everywhere. The whole file becomes one token stream (the tools cut windows out of
it); documents are not separated, which is what HF's strided-perplexity recipe does too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cqil.errors import CqilError
from cqil.model.tokenizer import load_tokenizer


def read_text(path: str | Path) -> str:
    """The file's text; refuses what cannot be held-out text (missing, empty, binary, not UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise CqilError(f"data: {path} does not exist")
    if not path.is_file():
        raise CqilError(f"data: {path} is not a file (expected a UTF-8 text file)")
    raw = path.read_bytes()
    if b"\x00" in raw:  # UTF-8 text never holds NUL; a weights or archive file nearly always does
        raise CqilError(f"data: {path} looks binary (it contains NUL bytes); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CqilError(f"data: {path} is not UTF-8 text (byte {e.start}: {e.reason})")
    if not text.strip():
        raise CqilError(f"data: {path} is empty")
    return text


def tokenize(tokenizer, text: str, max_tokens: int | None = None, min_tokens: int = 2) -> torch.Tensor:
    """The text as one 1-D int64 token stream, cut to `max_tokens`.

    The tokenizer's own special-token rule applies (a LLaMA tokenizer prepends BOS once), so every
    path measured on the same file sees the same ids.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence longer than model_max_length"
    try:
        ids = tokenizer(text)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < min_tokens:
        raise CqilError(f"data: the text gives {len(ids)} tokens, at least {min_tokens} are needed")
    return torch.tensor(ids, dtype=torch.long)


def load_token_stream(data_path, tokenizer_folder, max_tokens: int | None = None, min_tokens: int = 2) -> torch.Tensor:
    """read_text + load_tokenizer + tokenize: what each CLI needs from --data."""
    text = read_text(data_path)  # checked before the (slower) tokenizer load
    return tokenize(load_tokenizer(tokenizer_folder, what="data"), text, max_tokens, min_tokens)


def check_vocab(ids: torch.Tensor, vocab_size: int):
    """Refuse ids the model cannot embed (a tokenizer that is not the model's own)."""
    top = int(ids.max())
    if top >= vocab_size:
        raise CqilError(f"data: token id {top} is outside the model's vocabulary of {vocab_size}; "
                        f"is the tokenizer in the model folder the model's own?")
