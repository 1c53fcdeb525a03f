"""The Standard Webhooks format: the secret, the body, and the headers of one attempt.

The HMAC itself is the `standardwebhooks` package's (`Webhook.sign`), so a receiver verifying
with any Standard Webhooks library accepts what we send.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass
from datetime import datetime

from standardwebhooks import Webhook

PREFIX = "whsec_"
#: The specification asks for 24 to 64 random bytes.
MIN_BYTES, MAX_BYTES = 24, 64
NEW_SECRET_BYTES = 32
#: The event fields that become the body's envelope rather than its `data`.
ENVELOPE = ("type", "occurredAt")


def new_secret() -> str:
    """A fresh secret for HUMANCONNECT_WEBHOOK_SECRET."""
    return PREFIX + base64.b64encode(secrets.token_bytes(NEW_SECRET_BYTES)).decode()


def check_secret(secret: str) -> None:
    """Raise ValueError, never echoing the secret, unless it is `whsec_` + 24-64 base64 bytes."""
    if not secret.startswith(PREFIX):
        raise ValueError(f"must start with {PREFIX}")
    try:
        raw = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {PREFIX} followed by base64") from None
    if not MIN_BYTES <= len(raw) <= MAX_BYTES:
        raise ValueError(f"must decode to {MIN_BYTES}-{MAX_BYTES} bytes, not {len(raw)}")


def body(fields: dict[str, str]) -> str:
    """The delivery body of one event: `{"type", "timestamp", "data": {every other field}}`.

    Exactly what the event carries (events never carry a token), serialized once: the
    signature covers these bytes."""
    data = {k: v for k, v in fields.items() if k not in ENVELOPE}
    envelope = {"type": fields["type"], "timestamp": fields["occurredAt"], "data": data}
    return json.dumps(envelope, separators=(",", ":"), sort_keys=False)


@dataclass(frozen=True)
class Signer:
    """Signs attempts with one secret (held in this object only)."""

    webhook: Webhook

    @classmethod
    def from_secret(cls, secret: str) -> Signer:
        check_secret(secret)
        return cls(Webhook(secret))

    def headers(self, msg_id: str, payload: str, at: datetime) -> dict[str, str]:
        """The headers of one attempt at `at`: the timestamp is the attempt's, not the event's."""
        return {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self.webhook.sign(msg_id, at, payload),
            "user-agent": "humanconnect-webhooks/1",
        }
