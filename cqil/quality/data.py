"""Training and held-out data: whatever `--data` names becomes one stream of token ids.

The format follows the name:

    *.npy                    an integer array of token ids (flattened; memory-mapped)
    *.bin                    raw token ids as nanoGPT writes them (memory-mapped); `dtype` uint16 or
                             uint32, by default uint16 when the vocabulary fits in it, else uint32
    *.jsonl, *.json, *.parquet (optionally .gz/.bz2/.xz/.zst), a directory, or a glob pattern
                             rows read by `datasets.load_dataset` (streamed: nothing is converted or
                             cached); each row's `input_ids` (token ids) or `text` (a document); in a
                             directory or glob, .txt files are one document each
    anything else            one UTF-8 text file

Documents are tokenized one at a time with the tokenizer's own special-token rule (a LLaMA
tokenizer starts each with BOS) and joined with the EOS id between them when the tokenizer has
one; a single document therefore gives exactly the ids of the same text in a plain file, and
every tool measures the same ids for the same text. Token ids are used as they are.

Every quality tool reads its data here, so a missing, empty, binary or malformed file gives the
same one-line error everywhere. Not covered: shuffling documents or packing them into windows with
document masks (the tools cut windows out of the one stream, as HF's perplexity recipe does).
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch

from cqil.errors import CqilError, first_line
from cqil.model.tokenizer import load_tokenizer

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
ROW_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_ROWS_PER_READ = 1000


def read_text(path: str | Path) -> str:
    """The file's text; refuses what cannot be held-out text (missing, empty, binary, not UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise CqilError(f"data: {path} does not exist")
    if not path.is_file():
        raise CqilError(f"data: {path} is not a file (expected a UTF-8 text file)")
    raw = path.read_bytes()
    if b"\x00" in raw:  # UTF-8 text never holds NUL; a weights or archive file nearly always does
        raise CqilError(f"data: {path} looks binary (it contains NUL bytes); expected UTF-8 text, "
                        f"or token ids as .npy / .bin")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CqilError(f"data: {path} is not UTF-8 text (byte {e.start}: {e.reason})")
    if not text.strip():
        raise CqilError(f"data: {path} is empty")
    return text


def _quiet_tokenize(tokenizer, texts):
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence longer than model_max_length"
    try:
        return tokenizer(texts)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)


def tokenize(tokenizer, text: str, max_tokens: int | None = None, min_tokens: int = 2) -> torch.Tensor:
    """The text as one 1-D int64 token stream, cut to `max_tokens` (the tokenizer's special-token rule)."""
    ids = _quiet_tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < min_tokens:
        raise CqilError(f"data: the text gives {len(ids)} tokens, at least {min_tokens} are needed")
    return torch.tensor(ids, dtype=torch.long)


def load_token_stream(data_path, tokenizer_folder, max_tokens: int | None = None, min_tokens: int = 2) -> torch.Tensor:
    """read_text + load_tokenizer + tokenize, for a plain text file."""
    text = read_text(data_path)  # checked before the (slower) tokenizer load
    return tokenize(load_tokenizer(tokenizer_folder, what="data"), text, max_tokens, min_tokens)


def check_vocab(ids, vocab_size: int):
    """Refuse ids the model cannot embed (a tokenizer that is not the model's own, a wrong --dtype)."""
    top, low = int(ids.max()), int(ids.min())
    if low < 0:
        raise CqilError(f"data: token id {low} is negative")
    if top >= vocab_size:
        raise CqilError(f"data: token id {top} is outside the model's vocabulary of {vocab_size}; "
                        f"is the tokenizer in the model folder the model's own (or --dtype the file's)?")


def load_tokens(path: str | Path, tokenizer_folder: str | Path | None = None, max_tokens: int | None = None,
                dtype: str | None = None, vocab_size: int | None = None, min_tokens: int = 2) -> np.ndarray:
    """The token ids of `path` in any format above: a 1-D integer array, possibly a read-only memmap.

    The tokenizer of `tokenizer_folder` is loaded only for text. `vocab_size`, when given, picks the
    default .bin dtype and every id is checked against it.
    """
    path_str = str(path)
    if dtype is not None and dtype not in TOKEN_DTYPES:
        raise CqilError(f"data: --dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    if dtype is not None and not path_str.endswith(".bin"):
        raise CqilError(f"data: --dtype applies to .bin token files only, not {path_str}")
    if path_str.endswith(".npy"):
        ids = _npy(Path(path))
    elif path_str.endswith(".bin"):
        ids = _bin(Path(path), dtype, vocab_size)
    else:
        files = _row_files(path_str)
        if files is None:
            ids = np.asarray(tokenize(load_tokenizer(tokenizer_folder, what="data"), read_text(path),
                                      max_tokens, min_tokens).numpy())
        else:
            ids = _rows(path_str, files, tokenizer_folder, max_tokens)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < min_tokens:
        raise CqilError(f"data: {path_str} gives {len(ids)} tokens, at least {min_tokens} are needed")
    if vocab_size is not None:
        check_vocab(ids, vocab_size)
    return ids


def as_long(ids) -> torch.Tensor:
    """A 1-D int64 tensor of `ids` (array, memmap or tensor): what the measuring code takes."""
    if torch.is_tensor(ids):
        return ids.long()
    return torch.from_numpy(np.array(ids, dtype=np.int64))  # a copy: memmaps are read-only


# -- token arrays -----------------------------------------------------------------------------------

def _existing_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise CqilError(f"data: {path} does not exist")
    if not path.is_file():
        raise CqilError(f"data: {path} is not a file (expected {what})")
    return path


def _npy(path: Path) -> np.ndarray:
    _existing_file(path, "a .npy array of token ids")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CqilError(f"data: {path} is not a .npy array: {first_line(e)}") from None
    if not np.issubdtype(ids.dtype, np.integer):
        raise CqilError(f"data: {path} holds {ids.dtype} values; token ids must be integers")
    return ids.reshape(-1)


def _bin(path: Path, dtype: str | None, vocab_size: int | None) -> np.ndarray:
    _existing_file(path, "a .bin file of token ids")
    if dtype is None:
        dtype = "uint16" if vocab_size is None or vocab_size <= 2 ** 16 else "uint32"
    elif dtype == "uint16" and vocab_size is not None and vocab_size > 2 ** 16:
        raise CqilError(f"data: --dtype uint16 cannot hold the ids of a vocabulary of {vocab_size}; "
                        f"the file must be --dtype uint32")
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    size = path.stat().st_size
    if size == 0:
        raise CqilError(f"data: {path} is empty")
    if size % itemsize:
        raise CqilError(f"data: {path} has {size} bytes, not a whole number of {dtype} token ids; "
                        f"is --dtype right?")
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")


# -- rows through datasets --------------------------------------------------------------------------

def _row_format(file: str) -> str | None:
    suffixes = [s.lower() for s in Path(file).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return ROW_FORMATS.get(suffixes[-1]) if suffixes else None


def _row_files(path: str) -> list[str] | None:
    """The files to read as rows, or None for a single plain-text file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _row_format(str(f)))
        what = f"the directory {path}"
    elif not p.exists() and glob.has_magic(path):  # a file named "data[1].txt" is that file
        files = sorted(f for f in glob.glob(path, recursive=True) if Path(f).is_file())
        what = f"the pattern {path}"
    elif _row_format(path) not in (None, "text"):
        return [str(_existing_file(p, "a .jsonl, .json or .parquet file"))]
    else:
        return None
    if not files:
        raise CqilError(f"data: {what} matches no data files (.jsonl, .json, .parquet, .txt)")
    kinds = {_row_format(f) for f in files}
    if None in kinds or len(kinds) > 1:
        raise CqilError(f"data: {what} mixes file kinds ({', '.join(sorted(map(str, kinds)))}); "
                        f"give one kind of .jsonl/.json, .parquet or .txt files")
    return files


def _rows(path: str, files: list[str], tokenizer_folder, max_tokens: int | None) -> np.ndarray:
    import datasets

    kind = _row_format(files[0])
    options = {"sample_by": "document"} if kind == "text" else {}
    chunks, count, tokenizer, column = [], 0, None, None
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to load JSON" log: our error says it
    try:
        rows = datasets.load_dataset(kind, data_files=[glob.escape(f) for f in files], split="train", streaming=True,
                                     **options)  # names taken literally: datasets reads patterns
        for batch in rows.iter(batch_size=_ROWS_PER_READ):
            if column is None:
                column = next((c for c in ("input_ids", "text") if c in batch), None)
                if column is None:
                    raise CqilError(f"data: rows of {path} have no `input_ids` or `text` field "
                                    f"(they have {', '.join(batch) or 'none'})")
            if column == "text":
                if tokenizer is None:
                    tokenizer = load_tokenizer(tokenizer_folder, what="data")
                docs = _quiet_tokenize(tokenizer, [t for t in batch["text"] if t])
                chunks += _joined(docs, tokenizer.eos_token_id, first=count == 0)
            else:
                chunks += [np.asarray(row, dtype=np.int32) for row in batch["input_ids"] if row is not None]
            count = sum(len(c) for c in chunks)
            if max_tokens is not None and count >= max_tokens:
                break
    except CqilError:
        raise
    except Exception as e:  # malformed JSON, a broken parquet file, ...
        raise CqilError(f"data: cannot read {path}: {first_line(e)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if not count:
        raise CqilError(f"data: {path} holds no tokens")
    return np.concatenate(chunks)


def _joined(docs: list[list[int]], eos: int | None, first: bool) -> list[np.ndarray]:
    """Documents as arrays, each but the very first preceded by the EOS id (when there is one).

    int32: half the memory of int64 for a large corpus; every vocabulary fits.
    """
    out = []
    for i, doc in enumerate(docs):
        sep = [] if eos is None or (first and i == 0) else [eos]
        out.append(np.asarray(sep + list(doc), dtype=np.int32))
    return out
