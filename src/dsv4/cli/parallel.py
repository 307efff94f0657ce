"""`--parallel N`: run one model over N ranks (tensor + expert parallel, `portable.sharding`).

Who is who: the `dsv4` process the user started is rank 0 — it keeps the terminal, the tokenizer,
sampling, the CLI and the HTTP server — and, for a local run, it starts ranks 1..N−1 as
`python -m dsv4.cli.parallel` processes.  Under `torchrun` or `mlx.launch` every rank runs the same
`dsv4 …` command line; the ranks other than 0 turn into followers before the command runs
(`follow_if_launched`).  Either way a follower initializes the backend's distributed engine, receives
what to load from rank 0 (`parallel.LoadSpec`), loads its part and serves rank 0's runner calls.

Transport: torch.distributed (the `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT` environment; gloo on the
CPU, NCCL on CUDA) for the torch backend, mx.distributed (`MLX_HOSTFILE`/`MLX_RANK`; ring on a local run)
for MLX.

Ending together, never hanging: followers ignore Ctrl-C (rank 0 gets it, and its runner, if it was
mid-step, refuses to go on: `parallel.OutOfStep`); rank 0 watches its followers and, when one ends
before being released, prints which rank ended and how, ends the others and exits; a follower ends when
rank 0's process goes away; torch collectives time out (`DSV4_COLLECTIVE_TIMEOUT`).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CliError

POLL_S = 0.2


def launched_world() -> tuple[int, int, str] | None:
    """(rank, world, "torch"|"mlx") when this process is a rank started by a launcher, else None."""
    if "MLX_RANK" in os.environ and "MLX_HOSTFILE" in os.environ:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            return int(os.environ["MLX_RANK"]), len(json.load(f)), "mlx"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "torch"
    return None


def transport_of(backend: str) -> str:
    if backend == "mlx":
        return "mlx"
    if backend == "cuda":
        return "torch"
    raise CliError(f"--parallel runs on the cuda (torch) and mlx backends; {backend!r} runs in one process",
                   EXIT_USAGE)


def make_comm(transport: str):
    if transport == "mlx":
        from ..backends.mlx.dist import MlxComm
        return MlxComm("ring" if os.environ.get("DSV4_LOCAL_RANKS") else "any")
    from ..backends.cuda.dist import TorchComm
    return TorchComm(local_device())


def rank_options(transport: str) -> dict:
    """Backend options of this rank: torch ranks run eagerly (no CUDA graphs around NCCL collectives) on
    their own device."""
    return {"cuda_graphs": False, "device": local_device()} if transport == "torch" else {}


def local_device():
    """This rank's device: its local GPU when one is visible, else the CPU."""
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))
    return torch.device("cpu")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _rank_env(transport: str, world: int) -> list[dict]:
    """The environment of each local rank (this process is rank 0)."""
    base = {"DSV4_LOCAL_RANKS": str(world), "DSV4_PARENT_PID": str(os.getpid())}
    if transport == "mlx":
        fd, hostfile = tempfile.mkstemp(prefix="dsv4-hosts-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([[f"127.0.0.1:{p}"] for p in _free_ports(world)], f)
        atexit.register(os.unlink, hostfile)
        return [dict(base, MLX_HOSTFILE=hostfile, MLX_RANK=str(r)) for r in range(world)]
    port = _free_ports(1)[0]
    return [dict(base, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(r),
                 LOCAL_RANK=str(r)) for r in range(world)]


class Followers:
    """Ranks 1..N−1 of a local run, started by rank 0 and watched by a thread: a rank that ends before
    `release` ends the run (the others are killed, one line names it on stderr)."""

    def __init__(self, transport: str, world: int):
        envs = _rank_env(transport, world)
        os.environ.update(envs[0])
        self.released = False
        self.procs = {}
        for r in range(1, world):
            self.procs[r] = subprocess.Popen([sys.executable, "-m", "dsv4.cli.parallel", transport],
                                             env=dict(os.environ, **envs[r]), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL)
        atexit.register(self.end)
        threading.Thread(target=self._watch, daemon=True, name="dsv4-followers").start()

    def _watch(self) -> None:
        while not self.released:
            if any(p.poll() is not None for p in self.procs.values()) and not self.released:
                self.abort(None)
            time.sleep(POLL_S)

    def abort(self, exc: BaseException | None) -> None:
        """End the run in one line: the follower that ended (if one did), else what broke rank 0's step."""
        world = len(self.procs) + 1
        dead = self.dead()
        if dead is not None:
            line = f"rank {dead[0]} of {world} {dead[1]}; ending all ranks"
        elif isinstance(exc, TimeoutError):             # a peer hangs (`LeaderRunner`'s watch)
            line = f"rank 0: {exc}; ending all {world} ranks"
        else:
            line = f"{'interrupted' if isinstance(exc, KeyboardInterrupt) else type(exc).__name__} in the " \
                   f"middle of a step on rank 0; the ranks are out of step, ending all {world}"
        _abort(line, EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_FAILURE, self)

    def dead(self) -> tuple[int, str] | None:
        """(rank, how it ended) of a follower that has ended, waiting up to a second for one to show."""
        deadline = time.monotonic() + 1.0
        while True:
            for r, p in self.procs.items():
                code = p.poll()
                if code is not None:
                    return r, (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
            if time.monotonic() > deadline:
                return None
            time.sleep(POLL_S / 4)

    def release(self) -> None:
        """The run is over: followers may end now (rank 0 sent them `stop`)."""
        self.released = True

    def end(self, grace: float = 3.0) -> None:
        self.released = True
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def _abort(line: str, code: int, followers: Followers | None) -> None:
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    if followers is not None:
        followers.end()
    os._exit(code)


def load_parallel(path, backend: str, dtype: str, context: int, parallel: int | None, progress=None):
    """Rank 0's model of a parallel run: start the local followers (unless a launcher started the ranks),
    tell every rank what to load, load this rank's part.  The followers are released at exit."""
    import dsv4
    from ..portable.parallel import LoadSpec
    transport = transport_of(backend)
    launched = launched_world()
    if launched is not None:
        if parallel not in (None, launched[1]):
            raise CliError(f"--parallel {parallel} but the launcher started {launched[1]} ranks", EXIT_USAGE)
        followers = None
    else:
        followers = Followers(transport, parallel)
    comm = make_comm(transport)
    comm.broadcast(LoadSpec(str(path), backend, dtype, context))
    model = dsv4.load(path, backend=backend, dtype=dtype, context=context, progress=progress, comm=comm,
                      **rank_options(transport))

    if followers is not None:
        model.runner.on_broken = followers.abort
    else:           # under a launcher: it ends the other ranks once this one exits
        model.runner.on_broken = lambda exc: _abort(f"{type(exc).__name__} in the middle of a step on rank 0: "
                                                    f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                                    EXIT_FAILURE, None)

    def finish():
        if followers is not None:
            followers.release()
        model.runner.stop()
        comm.close()
    atexit.register(finish)
    return model


def follow_if_launched() -> None:
    """Under `torchrun` / `mlx.launch`, a rank other than 0 becomes a follower here and never returns."""
    launched = launched_world()
    if launched is not None and launched[0] > 0:
        follower_main(launched[2])


def _watch_parent(pid: int) -> None:
    while True:
        if os.getppid() != pid:
            os._exit(EXIT_FAILURE)
        time.sleep(POLL_S)


def follower_main(transport: str) -> None:
    """A follower's whole life: join, load what rank 0 says, serve its calls, exit."""
    import dsv4
    from ..portable.parallel import follow
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.environ.get("DSV4_PARENT_PID")
    if parent:
        threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    rank = "?"
    try:
        comm = make_comm(transport)
        rank = comm.rank
        spec = comm.broadcast()
        model = dsv4.load(spec.path, backend=spec.backend, dtype=spec.dtype, context=spec.context,
                          comm=comm, **rank_options(transport))
        follow(model.runner, comm)
    except Exception as e:     # one line naming the rank; rank 0 reports the run's end
        sys.stderr.write(f"error: rank {rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n")
        sys.stderr.flush()
        os._exit(EXIT_FAILURE)
    os._exit(0)


if __name__ == "__main__":
    follower_main(sys.argv[1])
