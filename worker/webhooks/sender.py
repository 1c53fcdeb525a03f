"""One delivery attempt over HTTP: a 2xx within the timeout counts, nothing else does.

urllib3 directly (requests' own transport): one shared, thread-safe pool per process, TLS
verified (urllib3's default), no retries of its own (the schedule retries), no redirects
followed (a redirect is a failed attempt: the receiver should be configured with its final
URL, and following one would send a signed body somewhere nobody configured).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)

from worker.webhooks.deliveries import RESPONSE_CHARS, Result

#: Read at most this much of a receiver's answer (we keep 200 characters of it).
MAX_READ = 4096


def safe_url(url: str) -> str:
    """The URL as it may be shown: no user:password, no query (either may hold a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


class Sender:
    """POSTs signed bodies; shared by every dispatcher thread of a process."""

    def __init__(self, timeout_s: float, pool_size: int = 8):
        self.timeout_s = timeout_s
        self.http = urllib3.PoolManager(
            num_pools=16,
            maxsize=pool_size,
            retries=False,
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        )

    def send(self, url: str, body: str, headers: dict[str, str]) -> Result:
        """One attempt. Never raises for what the network or the receiver does."""
        started = time.monotonic()
        try:
            resp = self.http.request(
                "POST",
                url,
                body=body.encode(),
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
            )
        except NewConnectionError:  # before its base class, ConnectTimeoutError
            return Result(False, error="connection refused")
        except (ConnectTimeoutError, ReadTimeoutError):
            return Result(False, error="timeout")
        except SSLError:
            return Result(False, error="TLS verification failed")
        except HTTPError as exc:
            return Result(False, error=f"connection error: {type(exc).__name__}")
        try:
            text = resp.read(MAX_READ, decode_content=True).decode("utf-8", "replace")
        except HTTPError:
            text = ""
        finally:
            # A longer answer is cut off with its connection rather than read to the end.
            if resp.length_remaining == 0:
                resp.release_conn()
            else:
                resp.close()
        response = text.strip()[:RESPONSE_CHARS] or None
        status = resp.status
        if time.monotonic() - started > self.timeout_s:
            return Result(False, status, "timeout", response)
        if 200 <= status < 300:
            return Result(True, status, None, response)
        if 300 <= status < 400:
            return Result(False, status, f"redirect not followed (HTTP {status})", response)
        return Result(False, status, f"HTTP {status}", response)
