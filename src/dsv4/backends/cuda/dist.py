"""`TorchComm`: the collectives of a parallel run on torch.distributed (gloo on the CPU, NCCL on CUDA).

The process group comes from the usual environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`:
what `torchrun` and `dsv4 … --parallel N` set).  Two groups, two timeouts: the model's collectives run
on the default group with a short timeout (`DSV4_COLLECTIVE_TIMEOUT`, seconds, default 120), so a peer
that dies or hangs mid-step ends every rank with an error instead of a hang; rank 0's calls to its
followers go over a gloo group with a long one (`DSV4_IDLE_TIMEOUT`, default a week), since a follower
waits there for as long as a chat user thinks.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ...portable.parallel import Comm, collective_timeout


def _seconds(var: str, default: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(var, default)))


class TorchComm(Comm):
    def __init__(self, device: torch.device | None = None):
        device = device or torch.device("cpu")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=collective_timeout()))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.control_group = dist.new_group(backend="gloo", timeout=_seconds("DSV4_IDLE_TIMEOUT", 7 * 86400))
        self.sent = 0                # bytes this rank contributed to the model's collectives
        self.control = 0             # bytes of rank 0's calls (pickled) broadcast over the control group

    def all_reduce(self, x):
        y = x.contiguous().clone()
        dist.all_reduce(y)
        self.sent += y.numel() * y.element_size()
        return y

    def all_gather(self, x, axis: int):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        self.sent += x.numel() * x.element_size()
        return torch.cat(parts, axis)

    def close(self) -> None:
        """Tear the process groups down (gloo's threads would otherwise abort the interpreter's exit)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        box = [data]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        self.control += len(box[0])
        return box[0]
