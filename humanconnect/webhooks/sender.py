"""One delivery attempt over HTTP: a 2xx within the timeout counts, nothing else does.

urllib3 directly (requests' own transport): one shared, thread-safe pool per process, TLS
verified (urllib3's default), no retries of its own (the schedule retries), no redirects
followed (a redirect is a failed attempt: the receiver should be configured with its final
URL, and following one would send a signed body somewhere nobody configured).
"""

from __future__ import annotations

import threading
import time
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import make_headers

from humanconnect.webhooks.deliveries import RESPONSE_CHARS, Result

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
    """POSTs signed bodies; shared by every dispatcher thread of a process.

    One connection pool per endpoint, looked up by URL: a PoolManager would parse the URL
    and pick the pool again on every send, about a third of a send's CPU."""

    def __init__(self, timeout_s: float, pool_size: int = 8):
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        #: url -> (its pool, the request target, headers of its own: Basic auth from the URL)
        self._pools: dict[str, tuple[urllib3.HTTPConnectionPool, str, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def _pool(self, url: str) -> tuple[urllib3.HTTPConnectionPool, str, dict[str, str]]:
        found = self._pools.get(url)
        if found is None:
            with self._lock:
                found = self._pools.get(url)
                if found is None:
                    parts = urlsplit(url)
                    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                    pool = urllib3.connection_from_url(
                        url,
                        maxsize=self.pool_size,
                        retries=False,
                        timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s),
                    )
                    auth = {}
                    if parts.username is not None:
                        userinfo = parts.netloc.rsplit("@", 1)[0]
                        auth = make_headers(basic_auth=unquote(userinfo))
                    found = self._pools[url] = (pool, target, auth)
        return found

    def send(self, url: str, body: str, headers: dict[str, str]) -> Result:
        """One attempt. Never raises for what the network or the receiver does."""
        started = time.monotonic()
        pool, target, auth = self._pool(url)
        try:
            resp = pool.urlopen(
                "POST",
                target,
                body=body.encode(),
                headers={**headers, **auth} if auth else headers,
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
