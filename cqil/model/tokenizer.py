"""The tokenizer files of a checkpoint or engine folder: which they are, whether there is one, loading it.

A folder "has a tokenizer" when it holds one of the files that define the vocabulary
(`tokenizer.json`, `tokenizer.model`, `vocab.json`); `generation_config.json` or
`tokenizer_config.json` alone are not one.
"""

from __future__ import annotations

from pathlib import Path

from cqil.errors import CqilError, first_line

# copied from the checkpoint into an engine directory when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
DEFINING = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).is_file() for f in DEFINING)


def load_tokenizer(folder: str | Path, what: str = "model"):
    """transformers.AutoTokenizer of `folder`, or a one-line CqilError saying why not."""
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise CqilError(f"{what}: {folder} has no tokenizer files ({', '.join(DEFINING)}); "
                        f"save the tokenizer next to the weights, or pass token ids instead of text")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # missing sentencepiece, a broken tokenizer.json, ...
        raise CqilError(f"{what}: cannot load the tokenizer in {folder}: {first_line(e)}") from None
