"""Data parallel fine-tuning: which process this is, its device, and the process group.

    torchrun --nproc-per-node 4 -m cqil.quality.finetune -- MODEL --p 2 --data train.bin -o adapter

torchrun starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK; `Workers.from_env`
reads them once, at the command line, and everything below takes the `Workers` value as an
argument. Each process trains on its own share of every step's windows; torch's
DistributedDataParallel averages the LoRA gradients (the only trainable weights) in the backward
pass, so every process applies the same update and rank 0 alone writes checkpoints, the log and
the adapter. Processes talk over gloo on CPU and NCCL on CUDA, each on `cuda:LOCAL_RANK`.

Not here: launching (torchrun, or `cqil-finetune --launcher torchrun`), sharding the base weights
(FSDP, ZeRO): every process holds the whole frozen model, which LoRA on 7B-13B models affords.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

from cqil.errors import CqilError


@dataclass(frozen=True)
class Workers:
    """This process's place among the training processes: rank 0 of 1 when run alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise CqilError(f"rank {self.rank} (local {self.local_rank}) is outside [0, WORLD_SIZE={self.world_size})")

    @classmethod
    def from_env(cls, env) -> "Workers":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process when WORLD_SIZE is unset."""
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            return cls(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        except ValueError:
            raise CqilError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env['WORLD_SIZE']!r} / "
                            f"LOCAL_RANK={env.get('LOCAL_RANK')!r} are not integers") from None

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device of this process: with several processes, `cuda` means cuda:LOCAL_RANK."""
        if not self.parallel or requested.type == "cpu":
            return requested
        if requested.index is not None:
            raise CqilError(f"--device {requested}: with {self.world_size} processes each one takes "
                            f"cuda:LOCAL_RANK; say --device cuda")
        if self.local_rank >= torch.cuda.device_count():
            raise CqilError(f"LOCAL_RANK {self.local_rank} has no CUDA device: this node has "
                            f"{torch.cuda.device_count()}; start at most that many processes per node")
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device, timeout_s: float = 1800.0):
        """Join the process group (env:// rendezvous, as torchrun sets it up)."""
        if not self.parallel:
            return
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                    rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise CqilError(f"rank {self.rank}: cannot join the process group: {str(e).splitlines()[0]}") from None

    def stop(self):
        if self.parallel:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def wrap(self, student: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DistributedDataParallel over the student; the student itself when alone.

        No initial broadcast: every process loaded the same checkpoint and seeded the same LoRA
        init, and broadcasting a 7B model's frozen weights would only move bytes that already agree.
        """
        if not self.parallel:
            return student
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                       init_sync=False, broadcast_buffers=False)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of `value` over every process (for the logged loss)."""
        if not self.parallel:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def barrier(self):
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()
