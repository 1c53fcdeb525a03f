"""Minting the provider's current-flow tokens in a worker, for a person who waits.

The web never holds the clientSecret, so it asks: `POST /connect/token` and an expired
`GET /users/{id}/access-token` queue a `mint_token` task on the waiting queue, at most one
per user and type at a time (the flight key, producer/mints.py), and wait for its result.
This module is that task's logic, and the access fetch an access finish's exchange runs
(humanconnect/exchange.py).

- A Connect token (`session` or `id`) is kept sealed in Redis while it lives, and handed out
  again while it has more than 60 s left: a page reloaded, a second tab, a burst retried after its
  `503` mints nothing more.
- An access token is stored (sealed) in the user's row with its expiry; a mint finds one
  with 5 minutes left and stops there, so reads that raced past each other's flight make
  one upstream call all the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import redis
from tenacity import RetryCallState

from humanconnect import erasure, metrics, redis_keys
from humanconnect.clock import now_us, redis_us, to_us
from humanconnect.crypto import Cipher, DecryptError
from humanconnect.errors import PermanentUpstreamError, TransientUpstreamError
from humanconnect.redis_clients import as_text
from humanconnect.runtime import Runtime
from humanconnect.storage import tokens
from humanconnect.upstream.auth import Minted, TokenType, mint
from humanconnect.upstream.client import Tokens
from humanconnect.upstream.guard import UpstreamGuard
from humanconnect.upstream.retry import retry_cause

log = logging.getLogger(__name__)

#: A Connect token is handed out again while it has more than this left.
CONNECT_MARGIN_S = 60
#: A stored access token is handed out while it has at least this left.
ACCESS_MARGIN_S = 300
#: How long a mint's result is kept for the requests waiting on it.
RESULT_TTL_S = 60
#: A session refused with one of these is taken as "the user exists already": the provider
#: documents no error body, so the status decides (never 401, the app's own credentials).
EXISTS_STATUSES = frozenset({400, 403, 409, 422})


class MintKind(StrEnum):
    """What a `mint_token` task is asked for."""

    #: A token to open Connect with: `id` for a stored user, else `session`.
    CONNECT = "connect"
    #: A fresh access token for a stored user.
    ACCESS = "access"


class MintState(StrEnum):
    OK = "ok"
    #: The provider could not be reached, or the breaker holds it off: try again later.
    UNAVAILABLE = "unavailable"
    #: The provider refused (a user with no connected source, say).
    REFUSED = "refused"


@dataclass(frozen=True)
class ConnectToken:
    """A Connect token as kept in Redis. Never logged: see __repr__."""

    token: str
    type: TokenType
    expires_at: float
    human_id: str

    def left_s(self) -> float:
        return self.expires_at - time.time()

    def __repr__(self) -> str:
        return f"ConnectToken(type={self.type!s}, human_id={self.human_id!r})"


def read_connect_token(r: redis.Redis, cipher: Cipher, user: str) -> ConnectToken | None:
    """The user's kept Connect token, if any (sync side; the web reads the same hash)."""
    return parse_connect_token(r.hgetall(redis_keys.connect_token(user)), cipher)


def parse_connect_token(raw: dict[bytes | str, bytes | str], cipher: Cipher) -> ConnectToken | None:
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    try:
        return ConnectToken(
            token=cipher.open(fields["token"]),
            type=TokenType(fields["type"]),
            expires_at=float(fields["expiresAt"]),
            human_id=fields.get("humanId", ""),
        )
    except (KeyError, ValueError, DecryptError):
        # Sealed under a key no longer configured: as if none were kept (the next mint
        # writes over it).
        return None


#: How long a flight holds off other mints of its user and kind: longer than a mint takes
#: (a session refused, then an id: two calls with their inline retries), so none overlap.
FLIGHT_TTL_S = 60

# KEYS: the flight key. ARGV: the mint id, the TTL. Renewed only if it is this mint's.
_HOLD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
"""

# KEYS: the flight key, the result, the done channel. ARGV: the mint id, state, error, TTL.
# The flight is released only if it is this mint's (a lapsed one's successor keeps its own).
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[2], 'state', ARGV[2], 'error', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', KEYS[3], ARGV[2])
"""


class Minter:
    """Mints for one worker process, through the shared upstream guard."""

    def __init__(self, rt: Runtime, guard: UpstreamGuard):
        self.rt = rt
        self.settings = rt.settings
        #: The exchanger's: one breaker (and its cached state) for every upstream call.
        self.guard = guard

    # -- the mint_token task ----------------------------------------------------------
    def run(self, mint_id: str, user: str, kind: MintKind, email: str | None = None) -> MintState:
        """Mint what was asked, keep it, and tell the waiting requests how it went."""
        timings: list[float] = []
        error = ""
        flight = redis_keys.mint_flight(kind, user)
        try:
            # The flight's term from now: a mint taken late from a long queue still holds
            # others off while it runs.
            self.rt.redis.eval(_HOLD, 1, flight, mint_id, FLIGHT_TTL_S)
            if kind is MintKind.CONNECT:
                self._connect(user, email, timings)
            else:
                self._access(user, timings)
            state = MintState.OK
        except TransientUpstreamError as exc:
            state, error = MintState.UNAVAILABLE, exc.reason
        except PermanentUpstreamError as exc:
            state, error = MintState.REFUSED, exc.reason
        except Exception as exc:  # Redis, the database, a key no longer configured, a bug
            # Never the message: a database error's carries its statement's parameters.
            state, error = MintState.UNAVAILABLE, f"internal: {type(exc).__name__}"
        try:
            metrics.observe_many(self.rt.redis, "upstream_seconds", timings, endpoint="token")
            metrics.inc(self.rt.redis, "mints", kind=kind, outcome=state)
            self.rt.redis.eval(
                _FINISH,
                3,
                flight,
                redis_keys.mint_result(mint_id),
                redis_keys.done_channel(mint_id),
                mint_id,
                state,
                error,
                RESULT_TTL_S,
            )
        except redis.exceptions.RedisError:
            # The waiting requests answer 503 at their deadline; the flight lapses on its own.
            log.warning("mint result not published mint=%s", mint_id)
        if state is not MintState.OK:
            log.warning("mint %s mint=%s kind=%s: %s", state, mint_id, kind, error)
        return state

    def _connect(self, user: str, email: str | None, timings: list[float]) -> None:
        started_us = redis_us(self.rt.redis)
        kept = read_connect_token(self.rt.redis, self.rt.cipher, user)
        if kept is not None and kept.left_s() > CONNECT_MARGIN_S:
            return  # minted by a mint that raced this one's flight
        with self.rt.db() as db:
            stored = tokens.user_row(db, user) is not None
        if stored:
            minted = self.call(user, TokenType.ID, timings)
        else:
            try:
                minted = self.call(user, TokenType.SESSION, timings, email=email)
            except PermanentUpstreamError as exc:
                if exc.status not in EXISTS_STATUSES:
                    raise
                # Connected before, through another deployment or the original flow.
                minted = self.call(user, TokenType.ID, timings)
        with self.rt.db() as db:
            if erasure.marked(db, (user,), started_us):
                raise PermanentUpstreamError("the user was erased")
        self._keep(user, minted)

    def _keep(self, user: str, minted: Minted) -> None:
        expires_at = time.time() + minted.expires_in
        key = redis_keys.connect_token(user)
        pipe = self.rt.redis.pipeline(transaction=False)
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "token": self.rt.cipher.seal(minted.token),
                "type": str(minted.type),
                "expiresAt": f"{expires_at:.3f}",
                "humanId": minted.human_id or "",
            },
        )
        # Kept while it lives: the request that asked hands it out whatever it has left;
        # others, only with more than CONNECT_MARGIN_S left.
        pipe.pexpireat(key, int(expires_at * 1000))
        pipe.execute()

    def _access(self, user: str, timings: list[float]) -> None:
        # Redis's clock, as a finish's receive time and an erasure's mark: one clock.
        received_us = redis_us(self.rt.redis)
        with self.rt.db() as db:
            row = tokens.user_row(db, user)
            if row is None:
                raise PermanentUpstreamError("no stored user")
            if fresh(row.access_expires_us):
                return  # another mint, or a finish, stored one meanwhile
            human_id = row.human_id
        got = self.fetch_access(user, human_id, timings, priority=True)
        with self.rt.db() as db:
            erasure.serialize(db, user)
            if erasure.marked(db, (user, got.human_id), received_us):
                raise PermanentUpstreamError("the user was erased")
            tokens.save_tokens(
                db,
                self.rt.cipher,
                human_id=got.human_id,
                client_user_id=user,
                access_token=got.access_token,
                public_token=None,
                received_us=received_us,
                session_hash=f"mint:{received_us}",
                access_expires_us=got.access_expires_us or received_us,
            )
            db.commit()

    # -- upstream calls ----------------------------------------------------------------
    def call(
        self,
        user: str,
        token_type: TokenType,
        timings: list[float],
        *,
        email: str | None = None,
        before: Callable[[], None] | None = None,
        before_sleep: Callable[[RetryCallState], None] | None = None,
        priority: bool = True,
    ) -> Minted:
        """One mint, through the breaker and the shared limit (ahead of queued work, with
        `priority`: a person waits)."""
        s = self.settings
        secret = s.client_secret.get_secret_value() if s.client_secret else ""

        def call() -> Minted:
            return mint(
                s.auth_url,
                client_id=s.effective_client_id,
                client_secret=secret,
                client_user_id=user,
                token_type=token_type,
                email=email,
                connect_timeout=s.connect_timeout_s,
                read_timeout=s.read_timeout_s,
            )

        return self.guard.call_with_retries(
            call,
            timings=timings,
            before=before,
            before_sleep=before_sleep or _note_retry(self.rt.redis),
            count_success=True,
            priority=priority,
        )

    def fetch_access(
        self,
        user: str,
        human_id: str | None,
        timings: list[float],
        *,
        before: Callable[[], None] | None = None,
        before_sleep: Callable[[RetryCallState], None] | None = None,
        priority: bool = False,
    ) -> Tokens:
        """An access token for `user`, with the humanId to store it under: the one given,
        else the stored user's, else the kept Connect token's, else an `id` mint's. The
        humanId comes first: the access mint is the last call before the store, so an outage
        of Redis or the database in between never costs a second access fetch."""
        if not human_id:
            with self.rt.db() as db:
                row = tokens.user_row(db, user)
                human_id = row.human_id if row else None
        if not human_id:
            kept = read_connect_token(self.rt.redis, self.rt.cipher, user)
            human_id = kept.human_id if kept else None

        def call(token_type: TokenType) -> Minted:
            return self.call(
                user,
                token_type,
                timings,
                before=before,
                before_sleep=before_sleep,
                priority=priority,
            )

        if not human_id:
            human_id = call(TokenType.ID).human_id
        if not human_id:
            raise PermanentUpstreamError("the provider named no humanId for the user")
        # The expiry counted from before the call: never later than the provider's.
        started_us = now_us()
        minted = call(TokenType.ACCESS)
        return Tokens(
            human_id=human_id,
            client_user_id=user,
            access_token=minted.token,
            public_token=None,
            access_expires_us=started_us + to_us(minted.expires_in),
        )


def fresh(expires_us: int | None, margin_s: float = ACCESS_MARGIN_S) -> bool:
    """Whether an access token with this expiry may be handed out (None: no expiry known,
    an original-flow token, which is)."""
    return expires_us is None or expires_us - now_us() >= to_us(margin_s)


def _note_retry(r: redis.Redis) -> Callable[[RetryCallState], None]:
    def note(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        metrics.inc(r, "retries", cause=retry_cause(exc), where="mint")

    return note
