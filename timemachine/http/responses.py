"""Formatting answers of the REST API: JSON bodies, with ``meta`` spliced in as stored."""

from __future__ import annotations

import json

from timemachine.domain.jobs import Job

JSON_CONTENT_TYPE = b"application/json"
# The Prometheus text format the scrapers of every version understand.
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def job_json(job: Job) -> str:
    """A job as the API shows it, as JSON text: `Job.to_json` and ``meta``.

    ``meta`` is spliced in as stored: decoding and encoding it again would rewrite
    the client's numbers, escapes and key order.
    """
    fields = json.dumps(job.to_json())
    return f'{fields[:-1]}, "meta": {job.meta}}}'


def jobs_page_json(jobs: list[Job], next_cursor: str | None) -> str:
    """A page of a job list as JSON text: ``{"jobs": [...], "next_cursor": ...}``."""
    listed = ", ".join(job_json(job) for job in jobs)
    return f'{{"jobs": [{listed}], "next_cursor": {json.dumps(next_cursor)}}}'


def respond(request, body, status: int = 200) -> bytes:
    """Set the status and JSON content type; return the encoded ``body``."""
    # ASCII escapes: any stored text encodes, whatever it holds.
    return respond_text(request, json.dumps(body), status)


def respond_text(request, text: str, status: int = 200) -> bytes:
    """`respond` with a body that is JSON text already."""
    # Stored meta text came from UTF-8 and holds no lone surrogate: it encodes.
    data = text.encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data
