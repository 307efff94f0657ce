"""Server-sent events framing and the streaming response both adapters return."""

from __future__ import annotations

import json

from fastapi.responses import StreamingResponse


def sse(data, event: str | None = None) -> str:
    """One SSE frame; `data` is JSON-encoded unless it is already a string (OpenAI's `[DONE]`)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class EventStream(StreamingResponse):
    """A streaming response that calls `on_close` however it ends.

    Why: when the client disconnects, the server stops iterating the frames generator without closing
    it, so its own cleanup would wait for garbage collection; `on_close` cancels the generation at once."""

    def __init__(self, frames, on_close):
        super().__init__(frames, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
