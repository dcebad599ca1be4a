"""The TextLocal API client: every call the daemon makes to TextLocal goes through here.

One `aiohttp.ClientSession` per client (one client per process), explicit timeouts, a rate
limit (the daemon's is per TextLocal account and shared by all replicas, `consumer.rate_limit`)
and a per-process concurrency cap, typed results (`consumer.textlocal_types`).

Errors (the tree is drawn in `consumer.errors`) are mapped at one boundary, `_post`:

- a reply with `status: failure` → `TextLocalApiError(code, message)`: permanent, not retried;
- HTTP 4xx other than 408 and 429 (the request itself is refused: bad request, authentication,
  not found, too large) → `TextLocalHttpError(http_status)`: permanent, not retried;
- HTTP 429 → `TextLocalRateLimited` (with Retry-After); HTTP 503 or 408 (refused before being
  acted on), connection refused, DNS failure or a connect timeout (nothing was sent) →
  `TextLocalUnavailable`. Both are retried here, by `consumer.retry`, the only place that
  retries, for every command;
- a failure after the request may have reached TextLocal (timeout waiting for the reply, the
  connection dropped mid-exchange, HTTP 5xx other than 503, an unreadable reply) →
  `TextLocalUnavailable` for calls that are safe to repeat, but `TextLocalOutcomeUnknown` for
  those that are not (`UNSAFE_TO_REPEAT`): the caller must look before it tries again.

Before each HTTP attempt the client takes a turn under the rate limit. When the shared limit
cannot be consulted (Redis down) the limiter raises `RateLimitUnavailable` (transient, not
retried here) after a bounded wait: the request was not made, whatever the command.

Why the timeouts tell "not sent" from "maybe sent": aiohttp raises `ConnectionTimeoutError`
when the `connect` timeout (which covers waiting for a pooled connection, DNS and the TCP/TLS
handshake) expires, and a plain `TimeoutError` when the `total` timeout expires. Settings keep
`request_timeout_s` at least a second above `connect_timeout_s` (aiohttp rounds timeouts of 5 s
and more up to the next second), so the total timeout can only fire after the connection was
made, i.e. once the request may have been written. The total timeout covers the HTTP exchange
only: what the caller does with a reply (e.g. `status_batch_messages`' visits, Redis work for a
million customers) runs after it is read, so it cannot make the request time out.

Secrets (API key, password, hash), phone numbers and message bodies never appear in a repr, a log
line or an exception text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random as random_module
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self, TypeVar
from urllib.parse import quote

import aiohttp
import yarl

from consumer import __version__
from consumer.clock import Clock, SystemClock, monotonic_s, to_unix_s
from consumer.errors import (
    ConfigError,
    TextLocalApiError,
    TextLocalHttpError,
    TextLocalOutcomeUnknown,
    TextLocalRateLimited,
    TextLocalUnavailable,
)
from consumer.logs import log_event
from consumer.rate_limit import RateLimiter, RequestRateLimiter
from consumer.retry import RetryPolicy, call_with_retries, parse_retry_after_s
from consumer.textlocal_types import (
    Balance,
    BatchStatus,
    BulkResult,
    Contact,
    ContactsPage,
    Group,
    HistoryEntry,
    HistoryPage,
    JsonObject,
    MalformedReply,
    MessageStatusBuffer,
    MessageStatuses,
    NewContact,
    OptOut,
    ScheduledSend,
    SenderNames,
    SendResult,
    Template,
    TopLevelArraySkipper,
    decode_reply,
    failure_of,
    parse_api_history,
    parse_balance,
    parse_batch_status,
    parse_bulk,
    parse_contacts_added,
    parse_contacts_page,
    parse_created_group,
    parse_groups,
    parse_history_page,
    parse_message_statuses,
    parse_optouts,
    parse_scheduled,
    parse_send,
    parse_sender_names,
    parse_templates,
)
from consumer.workflow import quote as quote_value

__all__ = [
    "MAX_CONTACTS_PER_BULK_CALL",
    "MAX_NUMBERS_PER_SEND",
    "UNSAFE_TO_REPEAT",
    "MessageVisitor",
    "TextLocalClient",
    "TextLocalCredentials",
    "TextLocalObserver",
    "TextLocalSettings",
]

ResultT = TypeVar("ResultT")
# Receives a batch's per-message statuses, run by run, once its status_batch reply is read.
MessageVisitor = Callable[[MessageStatuses], Awaitable[None]]

log = logging.getLogger(__name__)

MAX_CONTACTS_PER_BULK_CALL = 1500
MAX_NUMBERS_PER_SEND = 10_000

# Calls whose repetition after they may have been applied is not harmless: a second `send` or
# `bulk_json` sends the SMS twice; a second `create_group`, `delete_group` or `cancel_scheduled`
# fails with an error that hides the first call's success. Everything else is a read, or (for
# `create_contacts_bulk`) re-adding the same contacts to a group, which changes nothing.
UNSAFE_TO_REPEAT = frozenset(
    {"send", "bulk_json", "create_group", "delete_group", "cancel_scheduled"}
)

# Replies that list every recipient (about 40 bytes each); the client returns counts, so these
# arrays are skipped while reading instead of being decoded.
_PER_RECIPIENT_ARRAYS = {
    "send": frozenset({"messages"}),
    "status_batch": frozenset({"messages"}),
}
_READ_CHUNK_BYTES = 64 * 1024
_MULTIPART_ABOVE_BYTES = 16 * 1024
_FORBIDDEN_CREDENTIAL_CHARACTERS = frozenset("$&=")
_SORT_ORDERS = ("asc", "desc")


# --- configuration -------------------------------------------------------------------------


def _check_credential(setting: str, value: str) -> None:
    if not value:
        raise ConfigError(setting, "must not be empty")
    if _FORBIDDEN_CREDENTIAL_CHARACTERS & set(value):
        # The integration's documented rule; the value itself is never echoed.
        raise ConfigError(setting, "must not contain '$', '&' or '='")


@dataclass(frozen=True, repr=False)
class TextLocalCredentials:
    """An API key, or a username with a password or with a password hash (exactly one way).

    Prefer the named constructors. The repr shows which way and the username, never a secret.
    """

    api_key: str | None = None
    username: str | None = None
    password: str | None = None
    password_hash: str | None = None

    @classmethod
    def from_api_key(cls, api_key: str) -> TextLocalCredentials:
        return cls(api_key=api_key)

    @classmethod
    def from_password(cls, username: str, password: str) -> TextLocalCredentials:
        return cls(username=username, password=password)

    @classmethod
    def from_hash(cls, username: str, password_hash: str) -> TextLocalCredentials:
        return cls(username=username, password_hash=password_hash)

    def __post_init__(self) -> None:
        if self.api_key is not None:
            if self.username is not None or self.password is not None or self.password_hash:
                raise ConfigError(
                    "textlocal.api_key", "give either an API key or a username, not both"
                )
            _check_credential("textlocal.api_key", self.api_key)
            return
        if self.username is None:
            raise ConfigError("textlocal.api_key", "an API key or a username is required")
        _check_credential("textlocal.username", self.username)
        if (self.password is None) == (self.password_hash is None):
            raise ConfigError(
                "textlocal.password", "give exactly one of a password or a password hash"
            )
        if self.password is not None:
            _check_credential("textlocal.password", self.password)
        if self.password_hash is not None:
            _check_credential("textlocal.hash", self.password_hash)

    def form_fields(self) -> list[tuple[str, str]]:
        """The authentication parameters TextLocal expects in every request."""
        if self.api_key is not None:
            return [("apikey", self.api_key)]
        assert self.username is not None
        if self.password is not None:
            return [("username", self.username), ("password", self.password)]
        assert self.password_hash is not None
        return [("username", self.username), ("hash", self.password_hash)]

    def account_id(self, api_url: str) -> str:
        """A short name for the account these credentials reach at `api_url`, safe to show.

        16 hex digits of SHA-256 over the URL and the API key or the username (a password or a
        hash logs in to its username's account, so neither is part of it). It keys the account's
        shared rate limit in Redis, where no credential may go; the key cannot be read back.
        """
        who = f"apikey:{self.api_key}" if self.api_key is not None else f"user:{self.username}"
        return hashlib.sha256(f"textlocal-account\0{api_url}\0{who}".encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        if self.api_key is not None:
            return "TextLocalCredentials(api_key='***')"
        secret = "password" if self.password is not None else "password_hash"
        return f"TextLocalCredentials(username={self.username!r}, {secret}='***')"

    __str__ = __repr__


@dataclass(frozen=True)
class TextLocalSettings:
    """Where TextLocal is and how the client treats it; every bound is explicit."""

    api_url: str = "https://api.txtlocal.com/"
    connect_timeout_s: float = 5.0
    # Generous: "large reports may take several seconds", and a million-recipient `send` reply
    # is about 40 MB.
    request_timeout_s: float = 60.0
    # TextLocal publishes no limit; 10/s with 4 in flight stays far below what its clients use.
    # The rate and burst are the account's, shared by all replicas (consumer.rate_limit; a client
    # built without that limiter spaces its own requests 1/rate apart, no burst). The burst is how
    # many requests may go back to back after a quiet spell; the concurrency is per process.
    rate_limit_per_s: float = 10.0
    rate_limit_burst: int = 1
    max_concurrency: int = 4
    max_attempts: int = 5
    max_total_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 10.0
    retry_policy: RetryPolicy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_url", _checked_api_url(self.api_url))
        if not self.connect_timeout_s > 0:
            raise ConfigError("textlocal.connect_timeout_s", "must be positive")
        if not self.request_timeout_s >= self.connect_timeout_s + 1:
            raise ConfigError(
                "textlocal.request_timeout_s", "must be at least 1 s above connect_timeout_s"
            )
        if not self.rate_limit_per_s > 0:
            raise ConfigError("textlocal.rate_limit_per_s", "must be positive")
        if self.rate_limit_burst < 1:
            raise ConfigError("textlocal.rate_limit_burst", "must be at least 1")
        if self.max_concurrency < 1:
            raise ConfigError("textlocal.max_concurrency", "must be at least 1")
        object.__setattr__(
            self,
            "retry_policy",
            RetryPolicy(
                max_attempts=self.max_attempts,
                max_total_s=self.max_total_s,
                backoff_base_s=self.backoff_base_s,
                backoff_cap_s=self.backoff_cap_s,
            ),
        )


def _checked_api_url(api_url: str) -> str:
    """The URL with a trailing slash; credentials or a query in it are refused (never echoed:
    they may hold a key). A URL without either is quoted when its scheme or host is wrong."""
    try:
        url = yarl.URL(api_url)
    except (TypeError, ValueError) as exc:
        raise ConfigError("textlocal.api_url", "is not a URL") from exc
    if url.user is not None or url.password is not None:
        raise ConfigError("textlocal.api_url", "must not carry credentials")
    if url.query_string or url.fragment:
        raise ConfigError("textlocal.api_url", "must not have a query or fragment")
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            "textlocal.api_url", f"must be an http(s) URL with a host, got {quote_value(api_url)}"
        )
    return api_url if api_url.endswith("/") else api_url + "/"


# --- observation -----------------------------------------------------------------------------


class TextLocalObserver(Protocol):
    """A metrics hook, so the client does not depend on a metrics library.

    `request_finished` is called once per HTTP attempt with `outcome` one of "ok", "api_error",
    "http_error", "unavailable", "rate_limited", "outcome_unknown"; `retry_scheduled` before each
    backoff, with `reason` the error's class name ("TextLocalUnavailable" or
    "TextLocalRateLimited"), so both stay bounded sets fit for metric labels. `balance_checked`
    after every successful `balance` call, with the credits and when (Unix time, the client's
    clock).
    """

    def request_finished(self, command: str, outcome: str, duration_s: float) -> None: ...

    def retry_scheduled(self, command: str, reason: str, delay_s: float) -> None: ...

    def balance_checked(self, sms: float, mms: float, at_s: float) -> None: ...


class _SilentObserver:
    def request_finished(self, command: str, outcome: str, duration_s: float) -> None:
        pass

    def retry_scheduled(self, command: str, reason: str, delay_s: float) -> None:
        pass

    def balance_checked(self, sms: float, mms: float, at_s: float) -> None:
        pass


def _outcome_of(error: BaseException) -> str:
    if isinstance(error, TextLocalApiError):
        return "api_error"
    if isinstance(error, TextLocalHttpError):
        return "http_error"
    if isinstance(error, TextLocalRateLimited):
        return "rate_limited"
    if isinstance(error, TextLocalUnavailable):
        return "unavailable"
    if isinstance(error, TextLocalOutcomeUnknown):
        return "outcome_unknown"
    return "error"


# --- the client -------------------------------------------------------------------------------


class TextLocalClient:
    """TextLocal's API as typed async calls. Use as `async with TextLocalClient(...) as client`.

    Owns one aiohttp session unless one is passed in (then the caller closes it). Every HTTP
    attempt waits for a turn from `rate_limiter` (the daemon passes the account's shared
    `AccountRateLimiter`); without one, calls are spaced 1/rate_limit_per_s apart in this
    process only. `sleep`, `random`, `monotonic` and `clock` are injected for tests.
    """

    def __init__(
        self,
        settings: TextLocalSettings,
        credentials: TextLocalCredentials,
        *,
        observer: TextLocalObserver | None = None,
        rate_limiter: RateLimiter | None = None,
        session: aiohttp.ClientSession | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        random: Callable[[], float] = random_module.random,
        monotonic: Callable[[], float] = monotonic_s,
        clock: Clock | None = None,
    ) -> None:
        self._settings = settings
        self._credentials = credentials
        self._observer: TextLocalObserver = observer or _SilentObserver()
        self._session = session
        self._owns_session = session is None
        self._sleep = sleep
        self._random = random
        self._monotonic = monotonic
        self._clock: Clock = clock or SystemClock()
        self._concurrency = asyncio.Semaphore(settings.max_concurrency)
        if rate_limiter is None:
            rate_limiter = RequestRateLimiter(
                settings.rate_limit_per_s, monotonic=monotonic, sleep=sleep
            )
        self._rate_limiter = rate_limiter
        self._timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout_s,
            connect=settings.connect_timeout_s,
            sock_connect=settings.connect_timeout_s,
        )

    def __repr__(self) -> str:
        return (
            f"TextLocalClient(api_url={self._settings.api_url!r}, "
            f"credentials={self._credentials!r})"
        )

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the session (if none was given). Idempotent."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._settings.max_concurrency),
                timeout=self._timeout,
                headers={"User-Agent": f"textlocal-consumer/{__version__}"},
            )

    async def close(self) -> None:
        """Close the session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # --- commands ----------------------------------------------------------------------------

    async def send(
        self,
        *,
        message: str,
        group_id: int | None = None,
        numbers: Sequence[str | int] | None = None,
        sender: str | None = None,
        schedule_time: datetime | None = None,
        validity: datetime | None = None,
        custom: str | None = None,
        optouts: bool = False,
        test: bool = False,
        unicode: bool = False,
        receipt_url: str | None = None,
    ) -> SendResult:
        """Send (or schedule) `message` to a group or to numbers. Never repeated blindly.

        Raises `TextLocalOutcomeUnknown` when the request may have been applied but no reply
        came back: the caller reconciles (get_scheduled / get_history_group) before resending.
        A caller that cancels the call while it is in flight is in the same position.
        """
        if (group_id is None) == (numbers is None):
            raise ValueError("send needs exactly one of group_id or numbers")
        params: list[tuple[str, str]] = [("message", _pre_encoded(message))]
        if group_id is not None:
            params.append(("group_id", str(group_id)))
        if numbers is not None:
            params.append(("numbers", _joined_numbers(numbers)))
        if sender is not None:
            params.append(("sender", _pre_encoded(sender)))
        if schedule_time is not None:
            params.append(("schedule_time", str(_unix_s(schedule_time, "schedule_time"))))
        if validity is not None:
            params.append(("validity", str(_unix_s(validity, "validity"))))
        if custom is not None:
            params.append(("custom", custom))
        if receipt_url is not None:
            params.append(("receipt_url", receipt_url))
        params += _flags(optouts=optouts, test=test, unicode=unicode)
        return await self._call("send", params, parse_send)

    async def get_templates(self) -> list[Template]:
        return await self._call("get_templates", [], parse_templates)

    async def get_groups(self) -> list[Group]:
        return await self._call("get_groups", [], parse_groups)

    async def create_group(self, name: str) -> Group:
        """Create a group. TextLocal answers error 14 when the name is taken."""
        return await self._call("create_group", [("name", name)], parse_created_group)

    async def delete_group(self, group_id: int) -> None:
        """Delete a group and its contacts."""
        await self._call("delete_group", [("group_id", str(group_id))], _ignore_reply)

    async def get_contacts(
        self, group_id: int, *, start: int = 0, limit: int = 1000
    ) -> ContactsPage:
        if start < 0 or limit < 1:
            raise ValueError("start must be >= 0 and limit >= 1")

        def parse(reply: JsonObject) -> ContactsPage:
            return parse_contacts_page(reply, group_id=group_id, start=start, limit=limit)

        params = [("group_id", str(group_id)), ("start", str(start)), ("limit", str(limit))]
        return await self._call("get_contacts", params, parse)

    async def iter_contacts(
        self, group_id: int, *, page_size: int = 1000
    ) -> AsyncIterator[list[Contact]]:
        """The group's contacts, page by page, until a page comes back short."""
        start = 0
        while True:
            page = await self.get_contacts(group_id, start=start, limit=page_size)
            if page.contacts:
                yield list(page.contacts)
            # TextLocal may cap the page below what was asked; a page shorter than the smaller
            # of the two is the last one.
            if len(page.contacts) < min(page_size, page.limit):
                return
            start += len(page.contacts)

    async def create_contacts_bulk(self, group_id: int, contacts: Sequence[NewContact]) -> int:
        """Add up to 1,500 contacts to a group; returns TextLocal's `num_contacts`.

        Safe to retry: adding the same contacts to the same group again changes nothing.
        An empty list makes no call and returns 0.
        """
        if len(contacts) > MAX_CONTACTS_PER_BULK_CALL:
            raise ValueError(
                f"create_contacts_bulk takes at most {MAX_CONTACTS_PER_BULK_CALL} contacts "
                f"per call, got {len(contacts)}"
            )
        if not contacts:
            return 0
        payload = _json_text([contact.to_json() for contact in contacts])
        return await self.create_contacts_bulk_json(group_id, payload, len(contacts))

    async def create_contacts_bulk_json(self, group_id: int, contacts_json: str, count: int) -> int:
        """`create_contacts_bulk` with the `contacts` JSON array already serialised.

        For callers that keep contacts serialised (the executor's chunks): a million contacts
        are then never decoded and re-encoded. `count` is the array's length, checked against
        the 1,500 limit without parsing.
        """
        if count > MAX_CONTACTS_PER_BULK_CALL:
            raise ValueError(
                f"create_contacts_bulk takes at most {MAX_CONTACTS_PER_BULK_CALL} contacts "
                f"per call, got {count}"
            )
        if count == 0:
            return 0
        params = [("group_id", str(group_id)), ("contacts", contacts_json)]
        return await self._call("create_contacts_bulk", params, parse_contacts_added)

    async def status_batch(self, batch_id: int) -> BatchStatus:
        """Delivery counts of a batch (the per-recipient list is skipped, not decoded)."""
        return await self._call("status_batch", [("batch_id", str(batch_id))], parse_batch_status)

    async def status_batch_messages(self, batch_id: int, visit: MessageVisitor) -> BatchStatus:
        """Delivery counts of a batch, and every message's status, handed to `visit`.

        The reply is decoded as it streams in, each network chunk's complete `messages`
        elements making one `MessageStatuses` run (about 1,600 per 64 KB), held compactly
        (`MessageStatusBuffer`: about 14 MB per million messages, never the 40 MB of JSON).
        Only once the reply is read to its end, within the request timeout like any call, do
        the runs go to `visit`, in reply order, each awaited before the next: however long the
        visits take (Redis work for a million customers), the request cannot time out because
        of them. A failure reading the reply is retried like any read and reaches `visit`
        with nothing; an error `visit` raises ends the call, unretried, and the caller may
        call again: `visit` must tolerate seeing a message again in a later call.
        """
        runs = MessageStatusBuffer()
        status = await self._call(
            "status_batch", [("batch_id", str(batch_id))], parse_batch_status, collect=runs
        )
        for run in runs.drain():
            await visit(run)
        return status

    async def get_scheduled(self) -> list[ScheduledSend]:
        return await self._call("get_scheduled", [], parse_scheduled)

    async def cancel_scheduled(self, sent_id: int) -> None:
        """Cancel a scheduled send, by the `id` that get_scheduled reports."""
        await self._call("cancel_scheduled", [("sent_id", str(sent_id))], _ignore_reply)

    async def get_history_group(
        self,
        *,
        min_time: datetime | None = None,
        max_time: datetime | None = None,
        start: int = 0,
        limit: int = 1000,
        sort_order: str = "desc",
    ) -> HistoryPage:
        """One page of group sends; TextLocal's defaults are the last six months, newest first."""
        if sort_order not in _SORT_ORDERS:
            raise ValueError("sort_order must be 'asc' or 'desc'")
        if start < 0 or limit < 1:
            raise ValueError("start must be >= 0 and limit >= 1")
        params = [("start", str(start)), ("limit", str(limit)), ("sort_order", sort_order)]
        if min_time is not None:
            params.append(("min_time", str(_unix_s(min_time, "min_time"))))
        if max_time is not None:
            params.append(("max_time", str(_unix_s(max_time, "max_time"))))

        def parse(reply: JsonObject) -> HistoryPage:
            return parse_history_page(reply, start=start, limit=limit)

        return await self._call("get_history_group", params, parse)

    async def iter_history_group(
        self,
        *,
        min_time: datetime | None = None,
        max_time: datetime | None = None,
        page_size: int = 1000,
        sort_order: str = "desc",
    ) -> AsyncIterator[list[HistoryEntry]]:
        """Group sends page by page, until a short page or the reported total is reached."""
        start = 0
        while True:
            page = await self.get_history_group(
                min_time=min_time,
                max_time=max_time,
                start=start,
                limit=page_size,
                sort_order=sort_order,
            )
            if page.entries:
                yield list(page.entries)
            start += len(page.entries)
            if len(page.entries) < min(page_size, page.limit) or start >= page.total:
                return

    async def balance(self) -> Balance:
        balance = await self._call("balance", [], parse_balance)
        self._observer.balance_checked(balance.sms, balance.mms, self._clock.now().timestamp())
        return balance

    async def get_optouts(self, *, since: datetime | None = None) -> list[OptOut]:
        """The account's opt-outs, those added at or after `since` (TextLocal's `time`, Unix
        seconds) when given. A read: safe to repeat."""
        params = [] if since is None else [("time", str(_unix_s(since, "since")))]
        return await self._call("get_optouts", params, parse_optouts)

    async def get_sender_names(self) -> SenderNames:
        return await self._call("get_sender_names", [], parse_sender_names)

    async def bulk_json(
        self,
        messages: Sequence[tuple[str, str]],
        *,
        sender: str | None = None,
        test: bool = False,
        schedule_time: datetime | None = None,
        custom: str | None = None,
        unicode: bool = False,
        receipt_url: str | None = None,
    ) -> BulkResult:
        """Send personalised messages, (number, text) pairs, in one call. Never repeated blindly."""
        if len(messages) > MAX_NUMBERS_PER_SEND:
            raise ValueError(f"bulk_json takes at most {MAX_NUMBERS_PER_SEND} messages per call")
        encoded = _json_text(
            [{"number": _check_number(number), "text": text} for number, text in messages]
        )
        return await self.bulk_json_encoded(
            encoded,
            len(messages),
            sender=sender,
            test=test,
            schedule_time=schedule_time,
            custom=custom,
            unicode=unicode,
            receipt_url=receipt_url,
        )

    async def bulk_json_encoded(
        self,
        messages_json: str,
        count: int,
        *,
        sender: str | None = None,
        test: bool = False,
        schedule_time: datetime | None = None,
        custom: str | None = None,
        unicode: bool = False,
        receipt_url: str | None = None,
    ) -> BulkResult:
        """`bulk_json` with the messages already encoded: `messages_json` is the JSON array of
        `count` `{"number", "text"}` objects, numbers in international digits (the caller made
        it, e.g. from the contact index's normalised numbers: it is sent as it is)."""
        if count < 1:
            raise ValueError("bulk_json needs at least one message")
        if count > MAX_NUMBERS_PER_SEND:
            raise ValueError(f"bulk_json takes at most {MAX_NUMBERS_PER_SEND} messages per call")
        options: dict[str, object] = {}
        if sender is not None:
            options["sender"] = sender
        if test:
            options["test"] = True
        if schedule_time is not None:
            options["schedule_time"] = _unix_s(schedule_time, "schedule_time")
        if custom is not None:
            options["custom"] = custom
        if receipt_url is not None:
            options["receipt_url"] = receipt_url
        if unicode:
            options["unicode"] = True
        # {"messages": [...], ...options}: the array spliced in, not decoded and encoded again.
        rest = _json_text(options)[1:]
        data = '{"messages":' + messages_json + ("," + rest if options else "}")
        return await self._call("bulk_json", [("data", data)], parse_bulk)

    async def iter_history_api(
        self, *, min_time: datetime, max_time: datetime, page_size: int = 1000
    ) -> AsyncIterator[list[tuple[str, str]]]:
        """Messages sent through the API in the window, page by page: (number, text) pairs."""
        start = 0
        params_base = [
            ("min_time", str(_unix_s(min_time, "min_time"))),
            ("max_time", str(_unix_s(max_time, "max_time"))),
            ("sort_order", "asc"),
        ]
        while True:
            params = [*params_base, ("start", str(start)), ("limit", str(page_size))]
            page = await self._call("get_history_api", params, parse_api_history)
            if page.entries:
                yield list(page.entries)
            start += len(page.entries)
            if len(page.entries) < page_size or start >= page.total:
                return

    # --- the one path every call takes ---------------------------------------------------------

    async def _call(
        self,
        command: str,
        params: list[tuple[str, str]],
        parse: Callable[[JsonObject], ResultT],
        *,
        collect: MessageStatusBuffer | None = None,
    ) -> ResultT:
        async def attempt() -> ResultT:
            return await self._attempt(command, params, parse, collect)

        def on_retry(error: TextLocalUnavailable, delay_s: float) -> None:
            reason = type(error).__name__
            self._observer.retry_scheduled(command, reason, delay_s)
            log_event(
                log,
                "textlocal.retry_scheduled",
                logging.WARNING,
                command=command,
                reason=error.reason,
                http_status=error.http_status,
                delay_s=round(delay_s, 3),
            )

        return await call_with_retries(
            attempt,
            policy=self._settings.retry_policy,
            sleep=self._sleep,
            random=self._random,
            monotonic=self._monotonic,
            on_retry=on_retry,
        )

    async def _attempt(
        self,
        command: str,
        params: list[tuple[str, str]],
        parse: Callable[[JsonObject], ResultT],
        collect: MessageStatusBuffer | None = None,
    ) -> ResultT:
        async with self._concurrency:
            await self._rate_limiter.acquire()
            started_s = self._monotonic()
            try:
                reply = await self._post(command, params, collect)
                failure = failure_of(reply)
                if failure is not None:
                    raise TextLocalApiError(command, *failure)
                result = parse(reply)
            except MalformedReply as exc:
                error = self._reply_lost(command, f"malformed reply ({exc})")
                self._finished(command, error, started_s)
                raise error from exc
            except (
                TextLocalApiError,
                TextLocalHttpError,
                TextLocalUnavailable,
                TextLocalOutcomeUnknown,
            ) as error:
                self._finished(command, error, started_s)
                raise
            self._finished(command, None, started_s)
            return result

    async def _post(
        self,
        command: str,
        params: list[tuple[str, str]],
        collect: MessageStatusBuffer | None = None,
    ) -> JsonObject:
        """One HTTP exchange; the only place aiohttp's exceptions are translated."""
        if self._session is None:
            raise RuntimeError("TextLocalClient is not open: use 'async with' or await open()")
        fields = [*self._credentials.form_fields(), *params]
        # Large bodies (contact chunks of ~150 KB) go as multipart/form-data, as TextLocal's own
        # PHP class sends everything: urlencoding them in pure Python costs ~10 ms a call.
        large = sum(len(value) for _, value in fields) > _MULTIPART_ABOVE_BYTES
        form = aiohttp.FormData(fields, default_to_multipart=large)
        url = f"{self._settings.api_url}{command}/"
        try:
            async with self._session.post(url, data=form, timeout=self._timeout) as response:
                self._check_http_status(command, response)
                return await self._read_reply(command, response, collect)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing reached TextLocal: safe to try again, whatever the command.
            raise TextLocalUnavailable(command, f"cannot connect ({type(exc).__name__})") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else "connection failed"
            raise self._reply_lost(command, f"{what} ({type(exc).__name__})") from exc

    def _check_http_status(self, command: str, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if status == 200:
            return
        if status == 429:
            retry_after_s = parse_retry_after_s(
                response.headers.get("Retry-After"), self._clock.now()
            )
            raise TextLocalRateLimited(command, retry_after_s)
        if status >= 500 and status != 503:
            # 500, 502, 504: the request got past the front door and may have been acted on.
            raise self._reply_lost(command, f"HTTP {status}", http_status=status)
        if 400 <= status < 500 and status != 408:
            # The request itself is refused (bad request, authentication, not found, too large):
            # sent again, it would be refused again.
            raise TextLocalHttpError(command, status)
        # 503 and 408 mean TextLocal refused the request before acting on it, for now (other
        # statuses below 400 are treated the same).
        raise TextLocalUnavailable(command, f"HTTP {status}", http_status=status)

    async def _read_reply(
        self, command: str, response: aiohttp.ClientResponse, collect: MessageStatusBuffer | None
    ) -> JsonObject:
        """The reply decoded; with `collect`, its `messages` go there (what an earlier attempt
        left in it is dropped first)."""
        skipped = _PER_RECIPIENT_ARRAYS.get(command)
        if skipped is None:
            return decode_reply(await response.read())
        if collect is not None:
            collect.clear()
        skipper = TopLevelArraySkipper(skipped, capture=None if collect is None else "messages")
        async for chunk in response.content.iter_chunked(_READ_CHUNK_BYTES):
            skipper.feed(chunk)
            if collect is not None and (items := skipper.take_items()):
                collect.add(parse_message_statuses(items))
        return skipper.result()

    @staticmethod
    def _reply_lost(
        command: str, reason: str, *, http_status: int | None = None
    ) -> TextLocalUnavailable | TextLocalOutcomeUnknown:
        """The error for a request that may have been applied: retryable only if repeatable."""
        if command in UNSAFE_TO_REPEAT:
            return TextLocalOutcomeUnknown(command, reason)
        return TextLocalUnavailable(command, reason, http_status=http_status)

    def _finished(self, command: str, error: BaseException | None, started_s: float) -> None:
        duration_s = self._monotonic() - started_s
        outcome = "ok" if error is None else _outcome_of(error)
        self._observer.request_finished(command, outcome, duration_s)
        if isinstance(error, TextLocalOutcomeUnknown):
            log_event(
                log,
                "textlocal.outcome_unknown",
                logging.ERROR,
                command=command,
                reason=error.reason,
            )
        else:
            log_event(
                log,
                "textlocal.request_finished",
                logging.DEBUG,
                command=command,
                outcome=outcome,
                duration_s=round(duration_s, 3),
            )


# --- request encoding ---------------------------------------------------------------------------


def _pre_encoded(text: str) -> str:
    """TextLocal URL-decodes `message` and `sender` once more after the form decoding."""
    return quote(text, safe="")


def _check_number(number: str | int) -> str:
    text = str(number).strip()
    if not text.isdigit() or not text.isascii():
        # Never echo the number: it is personal data.
        raise ValueError("phone numbers must be international format digits only")
    return text


def _joined_numbers(numbers: Sequence[str | int]) -> str:
    if not numbers:
        raise ValueError("numbers must not be empty")
    if len(numbers) > MAX_NUMBERS_PER_SEND:
        raise ValueError(f"send takes at most {MAX_NUMBERS_PER_SEND} numbers per call")
    return ",".join(_check_number(number) for number in numbers)


def _unix_s(moment: datetime, name: str) -> int:
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return to_unix_s(moment)


def _flags(**flags: bool) -> list[tuple[str, str]]:
    """TextLocal reads `true`/`1` as on and an absent flag as off."""
    return [(name, "true") for name, on in flags.items() if on]


def _json_text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _ignore_reply(reply: JsonObject) -> None:
    return None
