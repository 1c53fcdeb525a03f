"""A humanconnect webhook receiver to copy: verify, refuse stale, deduplicate, answer fast.

    HUMANCONNECT_WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 9000

then set HUMANCONNECT_WEBHOOK_URLS=http://127.0.0.1:9000/hooks on the service. Every event
is printed as one line of JSON. What a real receiver keeps from this:

1. Verify before reading: `Webhook.verify` checks the `v1,` HMAC over id, timestamp and the
   body's exact bytes, and refuses a timestamp more than 5 minutes off (a replay).
2. Deduplicate on `webhook-id`: delivery is at least once, so the same event can arrive
   again after a timeout or a crash; the id is the event's `eventId`, the same every time.
   (This keeps ids in memory; a real app keeps them where it keeps the work they start.)
3. Answer 2xx at once and do the work afterwards: anything slower than the service's
   timeout (10 s) counts as a failure and is sent again.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import threading
from collections import OrderedDict

from standardwebhooks import Webhook, WebhookVerificationError

#: How many delivered ids are remembered for deduplication.
REMEMBER = 100_000


class Seen:
    """The webhook-ids already handled, oldest forgotten first."""

    def __init__(self, size: int = REMEMBER):
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, webhook_id: str) -> bool:
        with self._lock:
            if webhook_id in self._ids:
                return False
            self._ids[webhook_id] = None
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)
            return True


def handler(webhook: Webhook, seen: Seen, out: object = sys.stdout) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                event = webhook.verify(body, dict(self.headers.items()))
            except WebhookVerificationError as exc:
                self._answer(400, f"rejected: {exc}")
                return
            webhook_id = self.headers["webhook-id"]
            if seen.first_time(webhook_id):
                line = {"webhookId": webhook_id, "type": event["type"], "data": event["data"]}
                out.write(json.dumps(line) + "\n")  # type: ignore[attr-defined]
                out.flush()  # type: ignore[attr-defined]
            self._answer(204, "")

        def _answer(self, status: int, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per event above is the log

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    secret = os.environ.get("HUMANCONNECT_WEBHOOK_SECRET")
    if not secret:
        sys.exit("set HUMANCONNECT_WEBHOOK_SECRET (humanconnect webhooks secret prints one)")
    server = http.server.ThreadingHTTPServer(
        (args.host, args.port), handler(Webhook(secret), Seen())
    )
    sys.stderr.write(f"webhook receiver on http://{args.host}:{args.port}/hooks\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
