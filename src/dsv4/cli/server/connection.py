"""The uvicorn side of the server: a deadline on request headers, and the `uvicorn.Config` that uses it.

Why: uvicorn times out only idle keep-alive connections, and any byte received cancels that timer; a
client that sends its headers one byte at a time ("slowloris") holds its connection, and a slot of
the server, for as long as it likes.  `DeadlineH11Protocol` gives every request `read_timeout` seconds
for its headers, counted from the moment the connection opens or the previous response ends; a
connection that has not started a new request by then is closed.  (The body has the same deadline,
counted by `intake.Intake` once the headers are in.)
"""

from __future__ import annotations

import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dsv4.serve")


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline of `header_timeout` seconds (set by subclassing,
    see `uvicorn_config`: uvicorn builds protocols from a class and its own Config only)."""

    header_timeout: float = 20.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_deadline = None        # asyncio.TimerHandle while a request's headers are awaited
        self._waiting_after = None          # the request before the one awaited (None: none yet)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        self._arm_header_deadline()
        super().on_response_complete()      # may start a pipelined request, which disarms it

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._waiting_after and self._header_deadline is not None:
            self._header_deadline.cancel()  # a new request's headers are in
            self._header_deadline = None

    def connection_lost(self, exc) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._waiting_after = self.cycle
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self.cycle is self._waiting_after and not self.transport.is_closing():
            who = "%s:%d" % self.client if self.client else "a client"
            log.info("closed the connection of %s: no request headers within %g s", who, self.header_timeout)
            self.transport.close()


def uvicorn_config(app, **kwargs) -> uvicorn.Config:
    """The uvicorn Config serving `app` (from `build_app`) with the header deadline of its limits;
    `kwargs` go to `uvicorn.Config`."""
    protocol = type("DeadlineH11Protocol", (DeadlineH11Protocol,),
                    {"header_timeout": app.state.server.limits.read_timeout})
    return uvicorn.Config(app, http=protocol, **kwargs)
