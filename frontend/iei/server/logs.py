"""Logging of the frontend: one line per request with its id; never a payload or a key."""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# What we accept from a client's X-Request-Id; anything else is replaced by a fresh id.
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# Characters a client could use to forge or hide log lines: C0/C1 controls (newlines, escape
# sequences), Unicode line and paragraph separators, and the backslash that escapes them.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
# A logged client string is cut here: a 64 KiB path must not make a 64 KiB log line.
LOGGED_CHARS = 512


def request_id_from(header: str | None) -> str:
    return header if header and _VALID_ID.fullmatch(header) else uuid.uuid4().hex


def printable(text: str) -> str:
    """A client's string as it may appear in a log line: every control character escaped
    (`\\x0a`), so that one request is always one line, and at most LOGGED_CHARS of it."""
    cut = text[:LOGGED_CHARS]
    shown = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", cut)
    return shown + ("..." if len(text) > LOGGED_CHARS else "")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


def configure_logging() -> None:
    """Give the `iei` logger of a uvicorn worker a handler (uvicorn configures only its own)."""
    logger = logging.getLogger("iei")
    if any(isinstance(f, RequestIdFilter) for h in logger.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s iei[%(process)d] %(levelname)s %(request_id)s %(message)s")
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
