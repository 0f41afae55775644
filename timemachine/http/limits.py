"""Request limits of the REST API: body size, batch size, page size, and the request
class that enforces the body limit before anything is buffered."""

from __future__ import annotations

from io import BytesIO

from twisted.web import server

MAX_BODY_BYTES = 1024 * 1024
MAX_BATCH = 10_000
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


class LimitedRequest(server.Request):
    """A request that never buffers more than `max_body_bytes` of body.

    A larger body (announced by Content-Length, or found while reading a chunked one)
    is read and dropped, and `body_too_large` is set; the API then answers ``413
    E_TOO_LARGE`` without parsing anything.
    """

    max_body_bytes = MAX_BODY_BYTES
    body_too_large = False
    _body_received = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body_bytes:
            self.body_too_large = True
            # Free what was buffered: the request is refused anyway.
            self.content.close()
            self.content = BytesIO()
            return
        super().handleContentChunk(data)
