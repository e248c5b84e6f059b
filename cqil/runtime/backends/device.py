"""What the GPU-capable backends share: which device each rank gets, and a rank's device and stream.

    parse_devices("cuda", ranks=[0, 1])            # {0: cuda:0, 1: cuda:1} (or cuda:0 twice on one GPU)
    parse_devices(["cuda:0", "cuda:0"], [0, 1])    # two ranks sharing a GPU, one stream each

Values on a device are torch tensors; `DeviceRank` converts the Engine's numpy inputs once per step
and hands the logits back as float32 numpy (the one host synchronisation sampling needs).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from cqil.errors import CqilError


def parse_devices(devices, ranks: list[int]) -> dict[int, torch.device]:
    """`None` (CUDA if available, else CPU), one device for all ranks, or one per rank (a list, or
    a comma-separated string as `--devices cuda:0,cuda:1` gives it).

    A bare "cuda" spreads the ranks over the visible GPUs (rank r on cuda:{r % count}); with fewer
    GPUs than ranks, ranks share a GPU (one stream each).
    """
    if devices is None:
        devices = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(devices, str) and "," in devices:
        devices = [d.strip() for d in devices.split(",")]
    if isinstance(devices, (str, torch.device)):
        devices = [devices] * (max(ranks) + 1)
    devices = list(devices)
    if len(devices) <= max(ranks):
        raise CqilError(f"devices: {len(devices)} given, but the engine has rank {max(ranks)}: give one device per "
                        f"rank, or one for all (e.g. --devices cuda)")
    out = {}
    for r in ranks:
        try:
            d = torch.device(devices[r])
        except (RuntimeError, TypeError) as e:
            raise CqilError(f"devices: {devices[r]!r} (rank {r}) is not a device: use cpu, cuda or cuda:N") from None
        if d.type == "cuda":
            if not torch.cuda.is_available():
                why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
                raise CqilError(f"devices: rank {r} asks for {d}, but torch sees no CUDA device ({why}); "
                                f"use --devices cpu")
            d = torch.device("cuda", r % torch.cuda.device_count() if d.index is None else d.index)
            if d.index >= torch.cuda.device_count():
                raise CqilError(f"devices: rank {r} asks for {d}, but only {torch.cuda.device_count()} "
                                f"CUDA device(s) are visible")
        elif d.type != "cpu":
            raise CqilError(f"devices: {d} is not supported (use cpu or cuda)")
        out[r] = d
    if len({d.type for d in out.values()}) > 1:
        raise CqilError(f"devices: ranks mix CPU and CUDA devices ({[str(d) for d in out.values()]}); "
                        f"put every rank on CUDA or every rank on CPU")
    return out


class DeviceRank:
    """A rank's device and stream, and how its values move between numpy and torch.

    Shared by the torch and TensorRT backends.
    """

    def __init__(self, rank: int, device: torch.device, dtype: torch.dtype):
        self.rank, self.device, self.dtype = rank, device, dtype
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def tensor(self, env: dict, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """env[name] as a tensor on this rank's device (converted once, then stored back)."""
        value = env[name]
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
            if self.stream is not None and value.numel():
                value = value.pin_memory()  # from pageable memory the driver may wait for the stream
        if value.device != self.device or (dtype is not None and value.dtype != dtype):
            value = value.to(self.device, dtype=dtype, non_blocking=True)
        if env[name] is not value:
            env[name] = value
        return value

    def empty(self, shape, dtype: str) -> torch.Tensor:
        """An uninitialised tensor of a manifest dtype name on this rank's device."""
        return torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)

    def publish(self, name: str, value: torch.Tensor):
        """A segment output as the environment should hold it."""
        if name == "logits":  # sampling runs on the host: the step's one synchronisation
            return value.float().cpu().numpy()
        return value
