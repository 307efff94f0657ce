"""dsv4: a portable inference runtime for DeepSeek V4.

Public API (stable; see README):
    model = dsv4.load(path_or_preset, backend="reference", dtype="float32", emulate=False, context=None,
                      state_format=None)
    model.forward(ids)          -> float32 logits for every position, from a fresh state
    model.step(state, ids)      -> (logits, state): updates `state` in place; model.new_state(batch)
    model.fork_state(state), model.state_info(state) -> {"tokens", "capacity", "bytes"}
    model.generate(ids, ...) / model.stream(ids, ...) / model.generate_batch([ids, ...], ...)
    model.config, model.tokenizer
"""

from .portable.config import ConfigError, ModelConfig, preset
from .portable.runtime import BackendError, ContextError, Model, backend_names, load, register_backend

__all__ = ["load", "Model", "ModelConfig", "preset", "register_backend", "backend_names",
           "ConfigError", "BackendError", "ContextError"]
__version__ = "0.1.0"
