"""Write a random-weight HuggingFace checkpoint of a named shape, without holding the model in memory.

    python tools/make_checkpoint.py llama2-7b -o /work/scratch/llama2-7b          # ~13.5 GB, fp16
    python tools/make_checkpoint.py llama2-70b -o /tmp/llama2-70b --config-only   # config.json only
    python tools/make_checkpoint.py llama -o /tmp/tiny --dtype float32             # a cqil.testing preset

Output: `config.json` (architectures=["LlamaForCausalLM"] etc.), `model-0000k-of-0000N.safetensors`
shards of about `--shard-gb` each and `model.safetensors.index.json`, the layout of HuggingFace's
sharded `save_pretrained`. Tensors are made one at a time in checkpoint order (embedding, layers,
final norm, lm_head): N(0, std^2) for matrices and biases, ones for norm weights, each drawn in fp32
from its own generator seeded by (seed, tensor name) and then cast, so a tensor's values do not
depend on the shard size or on which other tensors exist, and fp16 / bf16 checkpoints round the
same numbers. Only the current shard is in memory (safetensors' `save_file` serializes it, so
the peak is about twice the shard size). The folder is built beside the output and renamed into
place at the end. Prints the time, the size and the peak RSS.

Left out: tokenizer files (the weights are random; `cqil` engines work on token ids), training.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

_LLAMA2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=32000,
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
               initializer_range=0.02, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=None, pretraining_tp=1, use_cache=True)

# the config.json of meta-llama/Llama-2-{7,13,70}b-hf, less its transformers_version
SHAPES = {
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
}


def shape_names() -> list[str]:
    from cqil.testing import PRESETS

    return [*SHAPES, *PRESETS]


def config_of(shape: str, dtype: str) -> dict:
    """The config.json of a named shape: one of SHAPES, or a `cqil.testing` preset."""
    if shape in SHAPES:
        raw = dict(SHAPES[shape])
    else:
        from cqil.testing import PRESETS, hf_config

        if shape not in PRESETS:
            raise SystemExit(f"make_checkpoint: unknown shape {shape!r}; choose from {', '.join(shape_names())}")
        raw = hf_config(shape).to_dict()
        raw.pop("transformers_version", None)
        raw["architectures"] = raw.get("architectures") or [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[raw["model_type"]]]
    raw.pop("dtype", None)
    raw["torch_dtype"] = dtype
    return raw


def tensor_shapes(raw: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint holds, in checkpoint order; nothing is allocated.

    Taken from cqil's own model built on the meta device, which has HuggingFace's parameter names;
    a tied lm_head is the embedding and is not stored, as `save_pretrained` does.
    """
    from cqil.model.config import ModelConfig
    from cqil.model.loader import build_meta_model

    model = build_meta_model(ModelConfig.from_hf(raw))
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def make_tensor(name: str, shape, seed: int, dtype, std: float):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen).mul_(std).to(dtype)


def plan_shards(shapes, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Consecutive tensors packed into shards of at most `shard_bytes` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, shape in shapes:
        n = itemsize
        for d in shape:
            n *= d
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    if current:
        shards.append(current)
    return shards


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_sharded_checkpoint(out_dir, shape: str = "llama2-7b", seed: int = 0, dtype: str = "float16",
                    shard_bytes: int = 2 << 30, std: float = 0.02, config_only: bool = False,
                    force: bool = False, log=print) -> dict:
    """Write the checkpoint to `out_dir`; returns a report {shape, files, bytes, seconds, peak_rss_mb}."""
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SystemExit(f"make_checkpoint: {out} exists and is not empty; pass --force to replace it")
    torch_dtype = getattr(torch, dtype)
    raw = config_of(shape, dtype)
    shapes = tensor_shapes(raw)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = [] if config_only else plan_shards(shapes, itemsize, shard_bytes)
    total = sum(itemsize * _numel(s) for _, s in shapes)
    if not config_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if total > free:
            raise SystemExit(f"make_checkpoint: {shape} needs {total / 1e9:.1f} GB, {out.parent} has "
                             f"{free / 1e9:.1f} GB free (use --config-only for a config-only checkpoint)")
    log(f"{shape}: {len(shapes)} tensors, {sum(_numel(s) for _, s in shapes) / 1e9:.2f} B parameters, "
        f"{total / 1e9:.2f} GB in {dtype}" + ("" if config_only else f", {len(shards)} shard(s)"))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        weight_map = {}
        for k, members in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: make_tensor(name, s, seed, torch_dtype, std) for name, s in members}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
            weight_map.update({name: file for name, _ in members})
            log(f"  {file}: {len(members)} tensors, {(tmp / file).stat().st_size / 1e9:.2f} GB "
                f"({time.perf_counter() - t0:.0f} s, peak RSS {peak_rss_mb():.0f} MiB)")
        if shards:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = {"shape": shape, "dtype": dtype, "files": sorted(p.name for p in out.iterdir()),
              "bytes": sum(p.stat().st_size for p in out.iterdir()),
              "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb())}
    log(f"wrote {out}: {report['bytes'] / 1e9:.2f} GB in {report['seconds']} s, peak RSS {report['peak_rss_mb']} MiB")
    return report


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make_checkpoint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", help=f"one of: {', '.join(shape_names())}")
    parser.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size limit in GiB (default 2)")
    parser.add_argument("--config-only", action="store_true", help="write config.json only (e.g. llama2-70b)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the random numbers")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    report = write_sharded_checkpoint(args.output, args.shape, seed=args.seed, dtype=args.dtype,
                             shard_bytes=int(args.shard_gb * (1 << 30)), std=args.std,
                             config_only=args.config_only, force=args.force)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
    sys.exit(main())
