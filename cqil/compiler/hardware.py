"""Hardware profiles for the latency model (`cqil.compiler.estimate`): published numbers, or measured here.

Every GPU number comes from a vendor datasheet or a published collective measurement, with its
source beside it; none is fitted to the CQIL paper's latencies (the model is compared with them in
docs/benchmarks.md, never tuned to them). The `cpu` profile is measured on the spot: copy
bandwidth, matmul throughput, ONNX Runtime's cost per node and the in-process collectives the
engine uses between rank threads.

Left out: clocks under power limits, L2 cache effects, NVLink SHARP, multi-node links.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import asdict, dataclass

from cqil.errors import CqilError


@dataclass(frozen=True)
class Hardware:
    """One device type and the link between p of them, as the latency model sees it.

    - `memory_gbs`: device memory bandwidth (GB/s) that decode's weight and KV reads see.
    - `peak_tflops`: dense fp16/bf16 tensor throughput (TFLOP/s); fp32 for the CPU.
    - `launch_us`: time one kernel (a graph node) adds beyond its own work when kernels run back to back.
    - `link_gbs`: interconnect bandwidth per device and direction (GB/s).
    - `allreduce_us`, `allgather_us`: small-message collective latency at p ranks, as ((p, us), ...);
      other p are interpolated linearly in p (extrapolated from the last two entries).
    - `step_us`: host work per decode step (sampling, handing the token back, the Python loop).
    - `shared_memory`: the ranks share one memory bus (CPU rank threads in one process), so
      concurrent layers divide the bandwidth instead of each having their own.
    """

    name: str
    description: str
    memory_gbs: float
    peak_tflops: float
    launch_us: float
    link_gbs: float
    allreduce_us: tuple[tuple[int, float], ...]
    allgather_us: tuple[tuple[int, float], ...]
    step_us: float
    shared_memory: bool = False

    def __post_init__(self):
        for name in ("memory_gbs", "peak_tflops", "link_gbs"):
            if not getattr(self, name) > 0:
                raise CqilError(f"hardware {self.name}: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("launch_us", "step_us"):
            if not getattr(self, name) >= 0:
                raise CqilError(f"hardware {self.name}: {name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("allreduce_us", "allgather_us"):
            table = getattr(self, name)
            if not table or sorted(p for p, _ in table) != [p for p, _ in table] or any(p < 2 for p, _ in table):
                raise CqilError(f"hardware {self.name}: {name} must list (p, us) for increasing p >= 2, got {table!r}")

    def collective_us(self, kind: str, p: int) -> float:
        """Small-message latency of `kind` ('all_reduce', 'all_gather' or 'broadcast') among p ranks."""
        if p < 2:
            return 0.0
        # a broadcast is p - 1 ring steps, like an all-gather (NCCL's tuning model counts them alike)
        table = self.allreduce_us if kind == "all_reduce" else self.allgather_us
        return _interpolate(table, p)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["allreduce_us"] = {str(p): us for p, us in self.allreduce_us}
        d["allgather_us"] = {str(p): us for p, us in self.allgather_us}
        return d


def _interpolate(table, p: int) -> float:
    """Linear in p between the entries around p; past the last, along the last two."""
    if len(table) == 1:
        return table[0][1]
    for (p0, t0), (p1, t1) in zip(table, table[1:]):
        if p <= p1:
            break
    return max(t0 + (t1 - t0) * (p - p0) / (p1 - p0), 0.0)


# -- collective latencies ----------------------------------------------------------------------------
#
# Measured: 2 x A100-SXM4-40GB over NVLink, nccl-tests all_reduce_perf (no CUDA graph), 32 B float
# sum: 10.14 us out of place, 10.21 us in place (github.com/NVIDIA/nccl/issues/583, 2021). A decode
# step's messages are a few KB ([B, 1, H]: 8 KB for LLaMA-7B in fp16), still latency-bound.
#
# Growth with p follows NCCL's own cost model (src/graph/tuning.cc, ring algorithm, LL protocol):
# every ring step adds the link's hardware latency, 0.47 us over NVLink and 1.0 us over PCIe; an
# all-reduce takes 2(p-1) steps, an all-gather or a broadcast p-1. What is left of the measured
# 10.14 us after its 2 NVLink steps (9.2 us: kernel launch, protocol set-up) does not depend on the
# link, so the PCIe tables start from it too.
#
# Cross-checks, not used: 8 x H100, NCCL all-reduce through torch.distributed from Python, 128 B:
# 19.2 us, 16 KB: 20.7 us (github.com/ByteDance-Seed/Triton-distributed/issues/57; the table below
# says 15.7 us at p=8 without Python); 2 x H100 with CUDA graphs and NVLink SHARP: ~6 us
# (github.com/NVIDIA/nccl/issues/1259). No non-graph p=2 figure for H100/H200 was found, so they
# use the A100's (the fixed part is launch and protocol, not the link).
_MEASURED_P2_NVLINK_US = 10.14
_NVLINK_STEP_US, _PCIE_STEP_US = 0.47, 1.0
_FIXED_US = _MEASURED_P2_NVLINK_US - 2 * _NVLINK_STEP_US


def _ring_tables(step_us: float, ps=(2, 4, 8)):
    allreduce = tuple((p, round(_FIXED_US + 2 * (p - 1) * step_us, 2)) for p in ps)
    allgather = tuple((p, round(_FIXED_US + (p - 1) * step_us, 2)) for p in ps)
    return allreduce, allgather


_NVLINK = _ring_tables(_NVLINK_STEP_US)
_PCIE = _ring_tables(_PCIE_STEP_US)

# A kernel launched right behind another on a stream costs ~1 us more than its run time (NVIDIA
# Technical Blog, "Getting Started with CUDA Graphs", 2019: a 2.9 us kernel took 3.8 us per launch
# back to back on a V100, 3.4 us inside a graph). cqil's torch backend decodes with CUDA graphs.
_GPU_LAUNCH_US = 1.0
# Per decode step: the next token's ids copied to the host and a stream sync (~10 us), plus the
# Python decode step (~10 us). An assumption, not a measurement; it is the same for every plan.
_GPU_STEP_US = 20.0

PROFILES = {
    # NVIDIA A100 datasheet (SXM4 80GB): HBM2e 2,039 GB/s; FP16 Tensor Core 312 TFLOPS dense (624
    # with sparsity); NVLink 3 600 GB/s total, i.e. 300 GB/s per direction. (The 40GB SXM4: 1,555 GB/s.)
    "a100-nvlink": Hardware("a100-nvlink", "NVIDIA A100-SXM4-80GB, NVLink 3 (NVSwitch)", memory_gbs=2039,
                            peak_tflops=312, launch_us=_GPU_LAUNCH_US, link_gbs=300,
                            allreduce_us=_NVLINK[0], allgather_us=_NVLINK[1], step_us=_GPU_STEP_US),
    # NVIDIA A100 datasheet (80GB PCIe): 1,935 GB/s; 312 TFLOPS; PCIe Gen4 x16 64 GB/s bidirectional.
    "a100-pcie": Hardware("a100-pcie", "NVIDIA A100 80GB PCIe, PCIe Gen4 x16 (no NVLink bridge)", memory_gbs=1935,
                          peak_tflops=312, launch_us=_GPU_LAUNCH_US, link_gbs=32,
                          allreduce_us=_PCIE[0], allgather_us=_PCIE[1], step_us=_GPU_STEP_US),
    # NVIDIA H100 datasheet (SXM5): HBM3 3.35 TB/s; FP16 Tensor Core 1,979 TFLOPS with sparsity,
    # 989.5 dense; NVLink 4 900 GB/s total, 450 per direction.
    "h100-sxm": Hardware("h100-sxm", "NVIDIA H100 SXM5 80GB, NVLink 4 (NVSwitch)", memory_gbs=3350,
                         peak_tflops=989.5, launch_us=_GPU_LAUNCH_US, link_gbs=450,
                         allreduce_us=_NVLINK[0], allgather_us=_NVLINK[1], step_us=_GPU_STEP_US),
    # NVIDIA H200 datasheet (SXM): HBM3e 141 GB at 4.8 TB/s; same GH100 compute as the H100 SXM
    # (1,979 TFLOPS FP16 with sparsity, 989.5 dense); NVLink 4 900 GB/s.
    "h200": Hardware("h200", "NVIDIA H200 SXM 141GB, NVLink 4 (NVSwitch)", memory_gbs=4800,
                     peak_tflops=989.5, launch_us=_GPU_LAUNCH_US, link_gbs=450,
                     allreduce_us=_NVLINK[0], allgather_us=_NVLINK[1], step_us=_GPU_STEP_US),
    # NVIDIA L40S datasheet: GDDR6 864 GB/s; FP16 Tensor Core 362.05 TFLOPS dense (733 with
    # sparsity); PCIe Gen4 x16 64 GB/s bidirectional; no NVLink.
    "l40s": Hardware("l40s", "NVIDIA L40S 48GB, PCIe Gen4 x16", memory_gbs=864,
                     peak_tflops=362.05, launch_us=_GPU_LAUNCH_US, link_gbs=32,
                     allreduce_us=_PCIE[0], allgather_us=_PCIE[1], step_us=_GPU_STEP_US),
}
NAMES = (*PROFILES, "cpu")


def hardware(name: str) -> Hardware:
    """The profile called `name`; 'cpu' is measured now (once per process)."""
    if name == "cpu":
        return measure_cpu()
    if name not in PROFILES:
        raise CqilError(f"unknown hardware {name!r}; profiles: {', '.join(NAMES)}")
    return PROFILES[name]


# -- this machine ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def measure_cpu(threads: int | None = None, copy_mb: int = 512) -> Hardware:
    """This machine as the CPU engine uses it: rank threads in one process, one memory bus (~1 s).

    Bandwidth is the read + write traffic of a large copy on every thread (what
    tools/bench_decode.py reports); peak is an fp32 matmul; launch cost is ONNX Runtime's time per
    node in a chain of tiny Adds, and the step cost the time of one session run; collective
    latencies are the engine's own in-process all-reduce / all-gather between p threads.
    """
    import numpy as np

    threads = threads or os.cpu_count() or 1
    node_us, run_us = _onnxruntime_costs(threads)
    allreduce = tuple((p, round(_collective_us(p, "all_reduce"), 2)) for p in (2, 4, 8))
    allgather = tuple((p, round(_collective_us(p, "all_gather"), 2)) for p in (2, 4, 8))
    gbs = _copy_gbs(threads, copy_mb)
    a = np.ones((1024, 1024), np.float32)
    seconds = min(_timed(lambda: a @ a) for _ in range(3))
    return Hardware("cpu", f"this machine: {os.cpu_count()} cores, {threads} threads, measured now",
                    memory_gbs=round(gbs, 2), peak_tflops=round(2 * 1024**3 / seconds / 1e12, 4),
                    launch_us=round(node_us, 2), link_gbs=round(gbs, 2), allreduce_us=allreduce,
                    allgather_us=allgather, step_us=round(run_us, 2), shared_memory=True)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _copy_gbs(threads: int, mb: int) -> float:
    """Read + write traffic of a large copy split over `threads` threads (numpy releases the GIL), GB/s."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    src = np.ones(mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(src.size), threads)]
    with ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
        best = min(_timed(copy) for _ in range(3))
    return 2 * src.nbytes / best / 1e9


def _onnxruntime_costs(threads: int) -> tuple[float, float]:
    """(us per node, us per session run) of ONNX Runtime on this CPU: a chain of n Adds, n = 1 and 65."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def model(n):
        nodes = [helper.make_node("Add", [f"x{i}", "one"], [f"x{i + 1}"]) for i in range(n)]
        graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 16])],
                                  [helper.make_tensor_value_info(f"x{n}", TensorProto.FLOAT, [1, 16])],
                                  [numpy_helper.from_array(np.ones((1, 16), np.float32), "one")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    x = {"x0": np.zeros((1, 16), np.float32)}

    def run_us(n):
        sess = ort.InferenceSession(model(n), opts, providers=["CPUExecutionProvider"])
        sess.run(None, x)
        return min(_timed(lambda: [sess.run(None, x) for _ in range(20)]) for _ in range(5)) / 20 * 1e6

    one, many = run_us(1), run_us(65)
    return max(many - one, 0.0) / 64, one


def _collective_us(p: int, kind: str, rounds: int = 50, repeats: int = 3) -> float:
    """Latency of an in-process collective among p rank threads on a [1, 1, 768] array: the best of
    `repeats` means over `rounds` (a shared machine's scheduling hiccups inflate single means).

    The mechanism of the engine's `cqil.runtime.collectives.LocalCollectives`: every rank deposits
    its value at one barrier whose action combines them (`rank_ordered_sum` for an all-reduce),
    rebuilt here so that measuring does not load the runtime.
    """
    import numpy as np

    from cqil.program import rank_ordered_sum

    values = [np.ones((1, 1, 768), np.float32) for _ in range(p)]
    result = []
    combine = (lambda: result.append(rank_ordered_sum(values))) if kind == "all_reduce" else (
        lambda: result.append(list(values)))
    barrier = threading.Barrier(p, action=combine, timeout=60)

    def once() -> float:
        start = threading.Barrier(p + 1, timeout=60)

        def rank(r):
            start.wait()
            for _ in range(rounds):
                values[r] = values[r] * 1  # the rank's new value
                barrier.wait()

        workers = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(p)]
        for w in workers:
            w.start()
        start.wait()
        t = time.perf_counter()
        for w in workers:
            w.join()
        return (time.perf_counter() - t) / rounds * 1e6

    return min(once() for _ in range(repeats))
