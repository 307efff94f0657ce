"""The `dsv4 serve` HTTP server: OpenAI- and Anthropic-compatible endpoints over one scheduler.

Layout: the scheduler is `dsv4.portable.engine` (run on its own thread), `generation` (token ids →
text events), `openai_api` / `anthropic_api` (the two wire formats), `fields` (request validation), `errors`,
`sse`, `tokens_api` (/tokenize, /detokenize), `metrics` (/metrics and the access log), `intake`
(Host, content type, body size and read deadline, before any route), `connection` (the uvicorn config
with a header deadline) and `app` (`build_app`, routing, API keys).
"""

from dsv4.portable.engine import Engine, Finished, Job, QueueFull

from .app import build_app

__all__ = ["build_app", "Engine", "Job", "Finished", "QueueFull"]
