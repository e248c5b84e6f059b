"""Compiling at scale, CI-sized: segments capped in bytes, checkpoints written tensor by tensor.

- `max_segment_bytes` below a tiny model's size cuts its outer layers into several segments with
  no collective between them; the engine still equals the unsplit one (logits within 1e-6, the same
  greedy tokens) and the manifest's per-segment weight bytes stay under the cap.
- `tools/make_checkpoint.py` writes sharded safetensors that cqil's loader and transformers read,
  with tensors that do not depend on the shard size.

The 7B run itself is in docs/benchmarks.md ("Compile at scale"); it is too big for CI.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cqil.model.config import ModelConfig
from cqil.model.loader import build_meta_model, load_model
from cqil.passes import build_graph
from cqil.exporters.manifest import read_manifest
from cqil.passes.partition import MAX_SEGMENT_BYTES, partition
from cqil.plan import Plan
from engine_util import STD, compile_engine, max_diff, new_tokens, open_engine

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 5
PLAN = dict(p=2, start=2, end=4)  # outer layers 0-1 and 4 on rank 0
# one tiny "llama" layer holds 43,136 fp32 weights (172,544 bytes): at most one layer a segment,
# and the embedding (65,536 bytes) apart from layer 0
CAP = 200_000


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama", init_std=STD, num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    # the plain graph: fused norms would round differently where a cut separates a residual Add
    # from the norm after it (SimplifiedLayerNormalization instead of the Skip form)
    return {"whole": compile_engine(checkpoint, root / "whole", fuse=False, **PLAN),
            "split": compile_engine(checkpoint, root / "split", max_segment_bytes=CAP, fuse=False, **PLAN)}


def test_cap_splits_outer_layers_without_collectives(engines):
    whole = read_manifest(engines["whole"])
    split = read_manifest(engines["split"])
    whole_segs = whole["ranks"][0]["segments"]
    split_segs = split["ranks"][0]["segments"]
    assert [s["layers"] for s in whole_segs][0] == [0, 1]  # the default cap leaves a tiny model alone
    assert len(split_segs) > len(whole_segs)
    prefix = [s for s in split_segs if s["layers"] and max(s["layers"]) < PLAN["start"]]
    assert [s["layers"] for s in prefix] == [[0], [1]]
    # the collectives are the same and in the same order: the new cuts sit between segment steps
    kinds = lambda m: [s["kind"] for s in m["ranks"][0]["program"] if s["kind"] != "segment"]
    assert kinds(split) == kinds(whole)
    program = [s["kind"] for s in split["ranks"][0]["program"]]
    assert program[:4] == ["segment"] * 3 + ["broadcast"]  # embedding | layer 0 | layer 1 | group input
    for rank in split["ranks"]:
        for seg in rank["segments"]:
            assert seg["weight_bytes"] <= CAP, f"rank {rank['rank']} {seg['name']}: {seg['weight_bytes']} bytes"


def test_split_engine_equals_whole_engine(engines):
    whole, split = open_engine(engines["whole"]), open_engine(engines["split"])
    try:
        ids = np.random.default_rng(0).integers(0, whole.config.vocab_size, (2, 9), dtype=np.int64)
        ref = whole.logits(ids)
        assert np.abs(ref).max() > 1.0
        assert max_diff(split.logits(ids), ref) <= 1e-6
        expected = new_tokens(whole, ids)
        assert (new_tokens(split, ids) == expected).all()
        assert len(set(expected.ravel().tolist())) > 4
    finally:
        whole.close()
        split.close()


def test_partition_cap_cuts_only_at_layer_starts(checkpoint):
    cfg = ModelConfig.from_dir(checkpoint)
    gm = build_graph(build_meta_model(cfg), Plan(LAYERS, **PLAN))
    default, uncapped = partition(gm, max_segment_bytes=MAX_SEGMENT_BYTES), partition(gm)
    assert [[s.layers for s in segs] for segs in default.segments.values()] == \
           [[s.layers for s in segs] for segs in uncapped.segments.values()]
    one_byte = partition(gm, max_segment_bytes=1)  # every unit alone: embedding, each layer, norm, lm_head
    rank0 = [(s.layers, sorted({n.split(".")[-2] for n, _ in s.gm.named_parameters()})) for s in one_byte.segments[0]]
    assert rank0[0] == ([], ["embed_tokens"])
    assert rank0[-2:] == [([], ["norm"]), ([], ["lm_head"])]
    assert all(len(layers) <= 1 for layers, _ in rank0)
    with pytest.raises(Exception, match="max_segment_bytes"):
        partition(gm, max_segment_bytes=0)


def _tool():
    spec = importlib.util.spec_from_file_location("make_checkpoint_tool", ROOT / "tools" / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_checkpoint_shards_load_in_cqil_and_transformers(tmp_path, hf_model):
    tool = _tool()
    quiet = dict(log=lambda msg: None)
    report = tool.write_sharded_checkpoint(tmp_path / "sharded", "llama", dtype="float32", shard_bytes=150_000, std=0.1, **quiet)
    folder = tmp_path / "sharded"
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and all(f"-of-{len(shards):05d}." in s.name for s in shards)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in load_model(folder).parameters())
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert report["bytes"] == sum(p.stat().st_size for p in folder.iterdir())

    model = load_model(folder)  # cqil's loader, through the index
    hf = hf_model(folder)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        ours, _ = model(ids, torch.ones_like(ids), torch.arange(7)[None], model.empty_cache(1))
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert ours.abs().max() > 1.0

    tool.write_sharded_checkpoint(tmp_path / "one", "llama", dtype="float32", std=0.1, **quiet)  # one shard
    single = load_model(tmp_path / "one")
    for (name, a), (_, b) in zip(model.named_parameters(), single.named_parameters()):
        assert torch.equal(a, b), f"{name} depends on the shard size"


def test_make_checkpoint_config_only_70b(tmp_path):
    report = _tool().write_sharded_checkpoint(tmp_path / "70b", "llama2-70b", config_only=True, log=lambda msg: None)
    assert report["files"] == ["config.json"]
    cfg = ModelConfig.from_dir(tmp_path / "70b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.intermediate_size) == (80, 8192, 8, 28672)
