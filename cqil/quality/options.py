"""Command-line flags the quality commands share: data, sequence length, device, precision."""

from __future__ import annotations

from cqil.errors import CqilError

PRECISION_CHOICES = ("fp32", "bf16", "fp16")


def add_data_flags(parser, seq_len_help: str, max_tokens_default=None, required=True):
    parser.add_argument("--data", required=required,
                        help="text file, .jsonl/.json/.parquet rows (`text` or `input_ids`), token ids "
                             "(.npy, .bin), or a directory or glob of them")
    parser.add_argument("--dtype", choices=("uint16", "uint32"),
                        help="element type of .bin token files (default: uint16 if the vocabulary fits, else uint32)")
    parser.add_argument("--seq-len", type=int, default=None, help=seq_len_help)
    parser.add_argument("--max-tokens", type=int, default=max_tokens_default,
                        help="use at most this many tokens of the data" +
                             (f" (default {max_tokens_default})" if max_tokens_default else " (default: all)"))


def add_device_flag(parser, default="cpu"):
    parser.add_argument("--device", default=default, help=f"cpu, cuda or cuda:N (default {default})")


def read_tokens(path, args, tokenizer_dir, vocab_size):
    """The ids of `path` under the data flags (--max-tokens, --dtype), checked against the vocabulary."""
    from cqil.quality.data import load_tokens

    return load_tokens(path, tokenizer_dir, args.max_tokens, args.dtype, vocab_size)


def seq_len_of(requested: int | None, default: int, limit: int | None) -> int:
    if requested is None:
        return min(default, limit) if limit else default
    if requested < 2:
        raise CqilError(f"--seq-len must be >= 2, got {requested}")
    if limit and requested > limit:
        raise CqilError(f"--seq-len {requested} is longer than the model's max_position_embeddings={limit}")
    return requested
