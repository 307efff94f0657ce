"""The `dsv4 serve` HTTP server: OpenAI- and Anthropic-compatible endpoints over one scheduler.

Layout: `engine` (scheduler thread that owns the model), `generation` (token ids → text events),
`openai_api` / `anthropic_api` (the two wire formats), `fields` (request validation), `errors`,
`sse`, `intake` (Host, content type, body size and read deadline, before any route), `connection`
(the uvicorn config with a header deadline) and `app` (`build_app`, routing, API keys).
"""

from .app import build_app
from .engine import Engine, Finished, Job, QueueFull

__all__ = ["build_app", "Engine", "Job", "Finished", "QueueFull"]
