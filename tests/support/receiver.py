"""A webhook receiver listening on a real port, with the faults a test turns on: a share of
answers 500, an answer held back, a fixed status (410, a redirect), or no listener at all."""

from __future__ import annotations

import http.server
import random
import threading
import time
from dataclasses import dataclass, field

from humanconnect.cli.procs import free_port


@dataclass(frozen=True)
class Received:
    """One request as the receiver read it, and what it answered."""

    headers: dict[str, str]
    body: str
    status: int
    at: float


@dataclass
class Receiver:
    """Answers 200 unless told otherwise; records every request it read."""

    fail_share: float = 0.0
    status: int = 200
    delay_s: float = 0.0
    location: str | None = None
    seed: int = 1
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> Receiver:
        """Listen (again) on the same port."""
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode()
                status = owner._answer()
                if owner.delay_s:
                    time.sleep(owner.delay_s)
                with owner._lock:
                    owner.received.append(
                        Received(
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            status,
                            time.monotonic(),
                        )
                    )
                self.send_response(status)
                if owner.location and 300 <= status < 400:
                    self.send_header("location", owner.location)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok" if status < 300 else b"no")

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that gave up (a timeout test) is expected, not news

        server = Server(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def _answer(self) -> int:
        with self._lock:
            failed = self.fail_share and self._rng.random() < self.fail_share
        return 500 if failed else self.status

    def down(self) -> None:
        """Stop listening: every attempt meanwhile is a refused connection."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    stop = down

    def delivered_ids(self) -> set[str]:
        """The webhook-ids this receiver answered with a 2xx."""
        with self._lock:
            return {r.headers["webhook-id"] for r in self.received if 200 <= r.status < 300}
