"""Live servers for the HTTP tests: uvicorn on 127.0.0.1 with a pre-bound random port, in a thread,
configured as `dsv4 serve` configures it (`uvicorn_config`: the header deadline).

Two models back them:
* `demo_model`: the `demo-random` preset (the V4 architecture at tiny sizes with the real tokenizer and
  random weights) on the NumPy reference backend; exercises the whole compute path (prefill, batched
  decode, prefix cache).
* `ScriptedModel`: a stand-in with the same interface whose logits spell out a scripted completion
  at given positions.  Random weights almost never write a tool call, so this is how the real
  tokenizer → detokenizer → parser → serializer path is driven through reasoning, content and DSML.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from types import SimpleNamespace

import numpy as np
import uvicorn

import dsv4
from dsv4.cli.serve import listen_socket
from dsv4.cli.server.connection import uvicorn_config
from dsv4.portable.encoding import from_anthropic, from_openai

API_KEY = "test-key-" + "".join(random.choices("abcdef0123456789", k=12))
WORDS = ("river", "lamp", "orbit", "violet", "cedar", "pixel", "harbor", "maple", "quartz", "ember",
         "tundra", "falcon", "copper", "meadow", "signal", "saffron")


def random_text(n: int = 3) -> str:
    """Fresh words for every call, so no test depends on one lucky prompt."""
    return " ".join(random.choice(WORDS) for _ in range(n))


@contextlib.contextmanager
def live(app):
    """Serve `app` on a random free loopback port, bound as `dsv4 serve` binds; yields the base URL."""
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class PositionRunner:
    """Stacks and splits position-only states the way a real runner does for batched decode."""

    @staticmethod
    def stack(states):
        return {"start": np.concatenate([s["start"] for s in states])}

    @staticmethod
    def split(state):
        return [{"start": state["start"][i:i + 1].copy()} for i in range(len(state["start"]))]


class ScriptedModel:
    """Model stand-in: the state is only the positions; `script[pos] = id` makes the logits predicting
    position `pos` favour `id` by a wide margin (other positions get random logits)."""

    def __init__(self, tokenizer, context: int = 2048, delay: float = 0.0):
        self.tokenizer, self.context, self.delay = tokenizer, context, delay
        self.config = SimpleNamespace(encoding="dsv4-2604", eos_token_id=tokenizer.eos_id,
                                      vocab_size=tokenizer.vocab_size)
        self.runner = PositionRunner()
        self.vocab = tokenizer.vocab_size
        self.script: dict = {}
        self._rng = np.random.default_rng()

    def new_state(self, batch: int = 1):
        return {"start": np.zeros(batch, dtype=np.int64)}

    def fork_state(self, state):
        return {"start": state["start"].copy()}

    def step(self, state, ids):
        ids = np.asarray(ids)
        start = state["start"] + ids.shape[1]
        if start.max() > self.context:
            raise dsv4.ContextError("past the context")
        if self.delay:
            time.sleep(self.delay)
        logits = self._rng.standard_normal((ids.shape[0], 1, self.vocab)).astype(np.float32)
        for b, pos in enumerate(start):
            if int(pos) in self.script:
                logits[b, 0, self.script[int(pos)]] = 100.0
        return logits, {"start": start}

    def plan(self, prompt_ids, completion: str) -> list:
        """Script `completion` (+ EOS) right after `prompt_ids`; returns the scripted ids."""
        ids = self.tokenizer.hf.encode(completion, add_special_tokens=False).ids + [self.tokenizer.eos_id]
        self.script.update({len(prompt_ids) + i: t for i, t in enumerate(ids)})
        return ids


def openai_prompt(tokenizer, request: dict) -> list:
    return tokenizer.encode_messages(**from_openai(request).as_kwargs())


def anthropic_prompt(tokenizer, request: dict) -> list:
    return tokenizer.encode_messages(**from_anthropic(request).as_kwargs())




def serve_configs(dsv4_cli, model, monkeypatch) -> tuple:
    """(run, configs): `run(*args)` runs `dsv4 serve --port P *args` on `model` with uvicorn's server
    stubbed out, so it returns at once; `configs` collects the `uvicorn.Config` each run built."""
    import socket

    from dsv4.cli import serve
    configs = []
    monkeypatch.setattr(serve, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(serve.uvicorn, "Server", lambda config: SimpleNamespace(run=lambda sockets: configs.append(config)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return (lambda *args: dsv4_cli("serve", "--port", port, *args)), configs
