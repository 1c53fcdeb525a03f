"""Encryption at rest (and in the queue) with Fernet keys; the first key encrypts, all decrypt."""

from __future__ import annotations

import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from humanconnect.errors import HumanConnectError


class DecryptError(HumanConnectError):
    """Raised when a ciphertext was not made by any of the configured keys."""


class Cipher:
    """Seal and open short strings (tokens) with a rotating set of Fernet keys."""

    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("at least one key is needed")
        self._primary = Fernet(keys[0])
        self._all = MultiFernet([Fernet(k) for k in keys])

    def seal(self, plaintext: str) -> str:
        """Encrypt under the first key."""
        return self._primary.encrypt(plaintext.encode()).decode("ascii")

    def open(self, ciphertext: str) -> str:
        """Decrypt with whichever key made it."""
        try:
            return self._all.decrypt(ciphertext.encode("ascii")).decode()
        except InvalidToken:
            raise DecryptError("ciphertext made by none of the configured keys") from None

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt under the first key (a no-op in meaning, a new ciphertext in bytes)."""
        try:
            return self._all.rotate(ciphertext.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise DecryptError("ciphertext made by none of the configured keys") from None

    def under_first_key(self, ciphertext: str) -> bool:
        """Whether the first key made it (a rotation has nothing to do)."""
        try:
            self._primary.decrypt(ciphertext.encode("ascii"))
        except InvalidToken:
            return False
        return True


def session_hash(session_token: str) -> str:
    """The idempotency key of a session: never the token in clear."""
    return hashlib.sha256(b"humanconnect/session\x00" + session_token.encode()).hexdigest()
