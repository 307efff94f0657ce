"""One rank of the parallel tests: `python -m tests.parallel.worker OUT MODEL BACKEND` under the
environment a launcher sets.  Rank 0 runs the scenario and saves what it saw to OUT (.npz); the other
ranks follow its calls.  The scenario: one-shot and chunked prefill logits, greedy decode (with a fork), decode logits."""

from __future__ import annotations

import sys

import numpy as np

import dsv4
from dsv4.portable import parallel

PROMPT = np.random.default_rng(3).integers(0, 1024, 37)


def scenario(model) -> dict:
    out = {"prefill": model.forward(PROMPT), "chunked": model.forward(PROMPT, chunk=10)}
    state = model.new_state(1)
    logits, state = model.step(state, PROMPT[None, :20])
    first = model.fork_state(state)               # a fork, advanced apart: the followers must keep both
    greedy = []
    for _ in range(8):
        greedy.append(int(np.argmax(logits[0, -1])))
        logits, state = model.step(state, np.asarray([[greedy[-1]]]))
    out["greedy"] = np.asarray(greedy)
    out["fork"], _ = model.step(first, np.asarray([[greedy[0]]]))
    state = model.new_state(1)
    logits, state = model.step(state, PROMPT[None, :30])
    decode = []
    for t in PROMPT[30:]:
        step, state = model.step(state, np.asarray([[t]]))
        decode.append(step[0, -1])
    out["decode"] = np.stack(decode)
    return out


def make_comm(backend: str):
    if backend == "mlx":
        from dsv4.backends.mlx.dist import MlxComm
        return MlxComm("ring")
    from dsv4.backends.cuda.dist import TorchComm
    return TorchComm()


def main(out: str, model_dir: str, backend: str) -> None:
    comm = make_comm(backend)
    opts = {"device": "cpu"} if backend == "cuda" else {}
    model = dsv4.load(model_dir, backend=backend, dtype="float32", comm=comm, **opts)
    if comm.rank != 0:
        parallel.follow(model.runner, comm)
    else:
        result = scenario(model)
        model.runner.stop()
        np.savez(out, **result)
    comm.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
