"""Running one model over N ranks: rank 0 leads, the others follow its steps.

Why this shape: the engine, the CLI and the HTTP server drive a model through its runner (`new_state`,
`step`, `fork`, `stack`, `split`, ...), and every rank must run the same runner calls in the same order,
since each step's collectives pair up across ranks.  So rank 0 wraps its runner in a `LeaderRunner` that
broadcasts each call (method name + arguments) before running it, and every other rank runs `follow`,
which receives those calls and runs them on its own runner — nothing above the runner knows the model is
split.  Sampling, scheduling, the tokenizer and the server stay on rank 0; the followers only compute.

States and other backend objects (a step's residual streams) never travel: each rank holds its own (the
state is replicated: `portable.sharding`), and a call names them by handle.  Both sides give handles to a
call's results in the same order (every non-plain value, walking tuples and lists), so the ids agree
without being sent back; when rank 0 drops an object, its handle's release rides on the next call.

Transport is the backend's distributed engine behind `Comm` (torch.distributed, mx.distributed): this
module only pickles calls over `Comm.broadcast`.  A call that fails on rank 0 before it is broadcast
changes nothing; one that fails on every rank alike (a bad argument) is answered with the same error on
each, and the ranks stay in step.  What leaves the ranks out of step — an interrupt in the middle of a
step, a lost peer — ends the run (`OutOfStep`; the launcher ends the other ranks).
"""

from __future__ import annotations

import os
import pickle
import threading
import weakref
from dataclasses import dataclass

import numpy as np

_PLAIN = (np.ndarray, np.generic, int, float, bool, str, bytes, type(None))
LOCAL = frozenset({"position", "state_to_numpy"})      # runner reads that change nothing: rank 0 alone
# Calls that come with state edits made through rank 0's `Ops` directly (speculative decoding's row undo,
# `portable.speculative.Undo`), which the followers would not see: refused before anything diverges.
UNSHARED = frozenset({"settle", "set_start"})


def collective_timeout() -> float:
    """Seconds a step's collectives may wait for the peers (`DSV4_COLLECTIVE_TIMEOUT`, default 120)."""
    return float(os.environ.get("DSV4_COLLECTIVE_TIMEOUT", 120))


class Comm:
    """A backend's collectives for one parallel run.  `all_reduce` / `all_gather` act on the backend's
    arrays (`Ops` calls them); `broadcast(obj)` sends a picklable object from rank 0 to every rank
    (rank 0 passes it, the others pass None and get it).  `times_out`: whether the engine's collectives
    give up after `collective_timeout()` themselves; for one whose do not, rank 0 watches each call."""

    rank: int = 0
    world: int = 1
    times_out: bool = True

    def all_reduce(self, x):
        raise NotImplementedError

    def all_gather(self, x, axis: int):
        raise NotImplementedError

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Leave the group (at the end of a run; nothing is sent)."""

    def broadcast(self, obj=None):
        data = self.broadcast_bytes(pickle.dumps(obj) if self.rank == 0 else None)
        return pickle.loads(data)


class OutOfStep(RuntimeError):
    """The ranks no longer run the same calls (an interrupted step, a lost peer): the run must end."""


@dataclass(frozen=True)
class LoadSpec:
    """What every rank loads: `dsv4.load`'s arguments, sent by rank 0 so followers need no command line
    (each rank adds its own backend options, such as its device)."""
    path: str
    backend: str
    dtype: str
    context: int


@dataclass(frozen=True)
class _Ref:
    handle: int


class _Handles:
    """Handles of the backend objects a rank holds for its peers' calls (see the module docstring)."""

    def __init__(self, leader: bool):
        self.leader, self.next = leader, 0
        self.objects: dict = {}        # follower: handle → object
        self.ids: dict = {}            # leader: id(object) → handle
        self.released: list = []       # leader: handles dropped since the last call

    def adopt(self, value):
        """Give handles to the non-plain values in `value` (tuples and lists walked), in order."""
        if isinstance(value, (tuple, list)):
            for v in value:
                self.adopt(v)
        elif not isinstance(value, _PLAIN) and not isinstance(value, dict):
            h, self.next = self.next, self.next + 1
            if self.leader:
                self.ids[id(value)] = h
                weakref.finalize(value, self._drop, id(value), h)
            else:
                self.objects[h] = value

    def _drop(self, key: int, h: int) -> None:
        self.ids.pop(key, None)
        self.released.append(h)

    def encode(self, value):
        """Rank 0's argument with each object that has a handle replaced by its `_Ref`."""
        if isinstance(value, (tuple, list)):
            return type(value)(self.encode(v) for v in value)
        h = None if isinstance(value, _PLAIN) else self.ids.get(id(value))
        return _Ref(h) if h is not None else value

    def decode(self, value):
        if isinstance(value, (tuple, list)):
            return type(value)(self.decode(v) for v in value)
        return self.objects[value.handle] if isinstance(value, _Ref) else value

    def take_released(self) -> list:
        out, self.released = self.released, []
        return out


class LeaderRunner:
    """Rank 0's runner: every method call (and attribute set) is broadcast to the followers, then run on
    the wrapped runner; reads in `LOCAL` and plain attributes are rank 0's own."""

    def __init__(self, runner, comm: Comm, on_broken=None):
        """`on_broken(exc)`, when given, is called when a call leaves the ranks out of step (before the
        exception propagates): a launcher ends the run there."""
        vars(self).update(_runner=runner, _comm=comm, _handles=_Handles(leader=True), _broken=None,
                          on_broken=on_broken, world=comm.world)

    def __getattr__(self, name):
        value = getattr(self._runner, name)
        if name in UNSHARED:
            raise ValueError("speculative decoding (draft_tokens > 0) is not available in a parallel run: "
                             "its row undo edits rank 0's state only; use draft_tokens 0")
        if not callable(value) or name in LOCAL or name.startswith("_"):
            return value

        def call(*args, **kwargs):
            return self._call(name, value, args, kwargs)
        return call

    def __setattr__(self, name, value):
        if name == "on_broken":
            vars(self)[name] = value
            return
        self._send(("setattr", name, value))
        setattr(self._runner, name, value)

    def _send(self, message) -> None:
        if self._broken:
            raise OutOfStep(self._broken)
        h = self._handles
        self._comm.broadcast((h.take_released(), message))

    def _call(self, name, method, args, kwargs):
        h = self._handles
        message = ("call", name, h.encode(list(args)), {k: h.encode(v) for k, v in kwargs.items()})
        watch = None
        if not self._comm.times_out and self.on_broken is not None:     # a peer that hangs ends the run
            limit = collective_timeout()
            watch = threading.Timer(limit, self.on_broken, [TimeoutError(
                f"{name} waited more than {limit:g} s for the other ranks (DSV4_COLLECTIVE_TIMEOUT)")])
            watch.daemon = True
            watch.start()
        try:
            self._send(message)
            result = method(*args, **kwargs)
        except (KeyboardInterrupt, OutOfStep, OSError, RuntimeError) as e:
            # an interrupt or a transport failure mid-call: the ranks' collectives no longer pair up
            vars(self)["_broken"] = f"the ranks are out of step after {type(e).__name__} in {name}"
            if self.on_broken is not None:
                self.on_broken(e)
            raise
        finally:
            if watch is not None:
                watch.cancel()
        h.adopt(result)
        return result

    def stop(self) -> None:
        """Release the followers (they return from `follow`)."""
        if not self._broken:
            self._comm.broadcast(([], ("stop",)))


def follow(runner, comm: Comm) -> None:
    """A follower's loop: run rank 0's calls on `runner` until it says stop.  A call that raises here is
    assumed to have raised on rank 0 too (same inputs, same code), so the loop goes on."""
    h = _Handles(leader=False)
    while True:
        released, message = comm.broadcast()
        for r in released:
            h.objects.pop(r, None)
        kind = message[0]
        if kind == "stop":
            return
        if kind == "setattr":
            setattr(runner, message[1], message[2])
            continue
        _, name, args, kwargs = message
        try:
            result = getattr(runner, name)(*h.decode(args), **{k: h.decode(v) for k, v in kwargs.items()})
        except Exception:
            continue
        h.adopt(result)
