"""A cheap webhook receiver for the firing benchmark, run as its own process.

Usage::

    python bench/receiver.py --port 4000 --dump /tmp/deliveries.json [--ready-file F]

Every POST (any path) is answered ``200`` at once, and one record is kept:
``[job_id, trigger_ms, arrival_s, attempt]`` where ``arrival_s`` is ``time.time()``
when the first byte of that request was read. ``GET /stats`` writes all records (and
the number of connections accepted) to the dump file and answers ``{"count": n,
"connections": n, "dump": path}``; ``SIGTERM`` writes them and exits. Each benchmark
run starts a receiver of its own, so there is nothing to reset.

Why raw asyncio and not twisted.web or Klein: the receiver shares the 2 CPUs with the
node under test, so it must cost as little as possible per delivery and must never be
the reason a delivery looks late. A hand-rolled HTTP/1.1 parser for keep-alive POSTs
with a Content-Length body is all the node's publisher needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

_RESPONSE_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_MAX_HEADER_BYTES = 64 * 1024


class Recorder:
    """Holds the delivery records and writes them out."""

    def __init__(self, dump_path: str):
        self.dump_path = dump_path
        self.records: list[list] = []
        # Connections opened by the node: about one per delivery means the
        # publisher does not reuse its keep-alive connections.
        self.connections = 0

    def add(self, job_id: str | None, trigger_ms: str | None, arrival_s: float,
            attempt: str | None) -> None:
        self.records.append([job_id, trigger_ms, arrival_s, attempt])

    def dump(self) -> None:
        """Write every record to the dump file, atomically (write then rename)."""
        tmp = self.dump_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"records": self.records, "connections": self.connections}, f)
        os.replace(tmp, self.dump_path)


class ReceiverProtocol(asyncio.Protocol):
    """One connection: parses pipelined/keep-alive HTTP/1.1 requests from a buffer."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.buffer = b""
        # Arrival time of the first byte of the request at the head of the buffer:
        # a request split over two reads still counts from its first byte.
        self.started_s = 0.0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.recorder.connections += 1

    def data_received(self, data: bytes):
        now = time.time()
        if not self.buffer:
            self.started_s = now
        self.buffer += data
        while self.buffer:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEADER_BYTES:
                    self.transport.close()
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            method, path = [*head[0].split(" "), "", ""][:2]
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self._handle(method, path, headers, self.started_s)
            # The next request in the buffer (if any) arrived in this read.
            self.started_s = now

    def _handle(self, method: str, path: str, headers: dict, arrival_s: float):
        if method == "GET" and path.startswith("/stats"):
            self.recorder.dump()
            body = json.dumps(
                {
                    "count": len(self.recorder.records),
                    "connections": self.recorder.connections,
                    "dump": self.recorder.dump_path,
                }
            ).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        if method == "POST":
            self.recorder.add(
                headers.get("x-timemachine-job-id"),
                headers.get("x-timemachine-trigger-ms"),
                arrival_s,
                headers.get("x-timemachine-attempt"),
            )
        self.transport.write(_RESPONSE_OK)


async def serve(port: int, recorder: Recorder, ready_file: str | None) -> None:
    """Listen on 127.0.0.1:port until SIGTERM/SIGINT, then dump the records."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(
        lambda: ReceiverProtocol(recorder), "127.0.0.1", port, backlog=1024
    )
    if ready_file:
        with open(ready_file, "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
    try:
        await stop
    finally:
        server.close()
        recorder.dump()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dump", required=True, help="file the records are written to")
    parser.add_argument("--ready-file", help="written with our PID once we listen")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, Recorder(args.dump), args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
