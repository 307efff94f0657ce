"""`MlxComm`: the collectives of a parallel run on mx.distributed (ring over TCP, JACCL, MPI).

The group comes from `mx.distributed.init` and the environment its launchers set (`mlx.launch`, or
`dsv4 … --parallel N`, which writes a localhost hostfile and sets `MLX_HOSTFILE` / `MLX_RANK` the same
way).  mx.distributed has no broadcast, so rank 0's calls travel as a sum in which only rank 0's bytes
are non-zero (a length first, then the bytes).  Its collectives take no timeout, so rank 0 times each
call it leads (`portable.parallel.LeaderRunner`, `DSV4_COLLECTIVE_TIMEOUT`) and ends the run when a peer
hangs; a dead peer is caught by the launcher, which ends every rank (`dsv4.cli.parallel`), and a lost
connection fails the ring's socket.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...portable.parallel import Comm


class MlxComm(Comm):
    times_out = False

    def __init__(self, backend: str = "any"):
        self.group = mx.distributed.init(strict=True, backend=backend)
        self.rank, self.world = self.group.rank(), self.group.size()
        self.sent = 0                # bytes this rank contributed to the model's collectives
        self.control = 0             # bytes of rank 0's calls (pickled) broadcast to the ranks

    def all_reduce(self, x):
        self.sent += x.nbytes
        return mx.distributed.all_sum(x, group=self.group)

    def all_gather(self, x, axis: int):
        self.sent += x.nbytes
        parts = mx.distributed.all_gather(mx.expand_dims(x, 0), group=self.group)     # [world, ...]
        return mx.concatenate([parts[r] for r in range(self.world)], axis=axis)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        n = mx.distributed.all_sum(mx.array([len(data) if self.rank == 0 else 0], dtype=mx.int32),
                                   group=self.group)
        size = int(n.item())
        buf = np.frombuffer(data, np.uint8) if self.rank == 0 else np.zeros(size, np.uint8)
        out = mx.distributed.all_sum(mx.array(buf), group=self.group)
        self.control += size
        return bytes(np.asarray(out, dtype=np.uint8))
