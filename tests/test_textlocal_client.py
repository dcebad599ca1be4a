"""The TextLocal client's own behaviour over real HTTP, against a server whose answers are scripted.

Covers what the sandbox cannot stage on cue: exactly when a connection fails, what goes on the
wire, the limits, and reading a million-recipient reply. The contract with TextLocal's replies
and error codes is tested against the sandbox (test_textlocal_contract.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, unquote

import pytest

from consumer.errors import (
    ConfigError,
    PermanentError,
    TextLocalApiError,
    TextLocalHttpError,
    TextLocalOutcomeUnknown,
    TextLocalRateLimited,
    TextLocalUnavailable,
)
from consumer.textlocal import (
    UNSAFE_TO_REPEAT,
    TextLocalClient,
    TextLocalCredentials,
    TextLocalSettings,
)
from consumer.textlocal_types import MessageStatuses, NewContact
from tests.test_textlocal_types import million_recipient_send_reply
from textlocal_sandbox import SandboxHandle

API_KEY = "Kq7-api-key-SECRET"
PASSWORD = "pa55-SECRET-word"
PASSWORD_HASH = "0123abcdSECRETHASH"
SECRETS = (API_KEY, PASSWORD, PASSWORD_HASH)
NUMBER = "447700900123"


# --- a scripted HTTP server ------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))


@dataclass(frozen=True)
class Reply:
    """Answer with this status, JSON body and headers."""

    body: object
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RawReply:
    """Answer 200 with these bytes as the body (for replies that are not JSON)."""

    body: bytes


@dataclass(frozen=True)
class Drop:
    """Read the whole request, then close the connection without a word."""


@dataclass(frozen=True)
class Stall:
    """Read the whole request, then say nothing for this long."""

    seconds: float


@dataclass(frozen=True)
class Stream:
    """Answer 200 in chunked transfer encoding, producing the chunks one at a time."""

    chunks: Callable[[], Iterable[bytes]]


Action = Reply | RawReply | Drop | Stall | Stream


def success(**fields: object) -> Reply:
    return Reply({**fields, "status": "success"})


def failure(code: int, message: str) -> Reply:
    return Reply({"errors": [{"code": code, "message": message}], "status": "failure"})


BALANCE = success(balance={"sms": 100, "mms": 0})


class ScriptedServer:
    """An HTTP/1.1 server that answers with `script` in order, then with `default` forever."""

    def __init__(self) -> None:
        self.script: list[Action] = []
        self.default: Action = BALANCE
        self.requests: list[RecordedRequest] = []
        self.arrivals_s: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold_s = 0.0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/"

    def commands(self) -> list[str]:
        return [request.path.strip("/") for request in self.requests]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append(RecordedRequest(method, path, headers, body))
        self.arrivals_s.append(time.monotonic())
        action = self.script.pop(0) if self.script else self.default
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold_s:
                await asyncio.sleep(self.hold_s)
            return await self._act(action, writer)
        finally:
            self.in_flight -= 1

    async def _act(self, action: Action, writer: asyncio.StreamWriter) -> bool:
        if isinstance(action, Drop):
            return False
        if isinstance(action, Stall):
            await asyncio.sleep(action.seconds)
            return False
        if isinstance(action, Stream):
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for chunk in action.chunks():
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if isinstance(action, Reply):
            status, body, extra = action.status, json.dumps(action.body).encode(), action.headers
        else:
            status, body, extra = 200, action.body, {}
        head = [f"HTTP/1.1 {status} Scripted", f"Content-Length: {len(body)}"]
        head += ["Content-Type: application/json", *(f"{k}: {v}" for k, v in extra.items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return True


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    await scripted.start()
    yield scripted
    await scripted.stop()


@dataclass
class RecordingObserver:
    finished: list[tuple[str, str]] = field(default_factory=list)
    retries: list[tuple[str, str, float]] = field(default_factory=list)

    def request_finished(self, command: str, outcome: str, duration_s: float) -> None:
        self.finished.append((command, outcome))

    def retry_scheduled(self, command: str, reason: str, delay_s: float) -> None:
        self.retries.append((command, reason, delay_s))

    def balance_checked(self, sms: float, mms: float, at_s: float) -> None:
        pass


async def no_sleep(seconds: float) -> None:
    """Backoffs and rate-limit waits pass at once; the observer records what they were."""
    await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def open_client(
    url: str,
    *,
    observer: RecordingObserver | None = None,
    credentials: TextLocalCredentials | None = None,
    sleep: Callable[[float], object] | None = None,
    **settings: float,
) -> AsyncIterator[TextLocalClient]:
    fields: dict[str, float] = {
        "connect_timeout_s": 0.3,
        "request_timeout_s": 1.3,
        "rate_limit_per_s": 1000.0,
        "max_attempts": 4,
        **settings,
    }
    client = TextLocalClient(
        TextLocalSettings(api_url=url, **fields),  # type: ignore[arg-type]
        credentials or TextLocalCredentials.from_api_key(API_KEY),
        observer=observer,
        sleep=sleep or no_sleep,  # type: ignore[arg-type]
    )
    async with client:
        yield client


def assert_no_secrets(error: BaseException) -> None:
    """Neither the error nor anything chained to it shows a secret or a phone number."""
    seen: BaseException | None = error
    while seen is not None:
        text = f"{seen!s} {seen!r} {getattr(seen, '__notes__', '')}"
        for secret in (*SECRETS, NUMBER):
            assert secret not in text, type(seen).__name__
        seen = seen.__cause__ or seen.__context__


def free_port() -> int:
    """A port nothing listens on: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- configuration and secrets --------------------------------------------------------------


@pytest.mark.parametrize("character", ["$", "&", "="])
@pytest.mark.parametrize(
    ("build", "setting"),
    [
        (lambda v: TextLocalCredentials.from_api_key(f"ab{v}cd"), "textlocal.api_key"),
        (lambda v: TextLocalCredentials.from_password(f"me{v}x", "pw"), "textlocal.username"),
        (lambda v: TextLocalCredentials.from_password("me", f"p{v}w"), "textlocal.password"),
        (lambda v: TextLocalCredentials.from_hash("me", f"h{v}h"), "textlocal.hash"),
    ],
)
def test_credentials_with_reserved_characters_are_refused(
    build: Callable[[str], TextLocalCredentials], setting: str, character: str
) -> None:
    """A credential containing $, & or = is refused, naming the setting but not the value."""
    with pytest.raises(ConfigError) as raised:
        build(character)
    assert raised.value.setting == setting
    assert character not in str(raised.value).split(":", 1)[1].replace("'$', '&' or '='", "")


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"api_key": "k", "username": "u"},
        {"username": "u"},
        {"username": "u", "password": "p", "password_hash": "h"},
        {"api_key": ""},
    ],
)
def test_credentials_need_exactly_one_way_in(fields: dict[str, str]) -> None:
    """Credentials are an API key, or a username with exactly one of password or hash."""
    with pytest.raises(ConfigError):
        TextLocalCredentials(**fields)


def test_reprs_never_show_secrets() -> None:
    """repr and str of credentials, settings and client show no key, password or hash."""
    credentials = [
        TextLocalCredentials.from_api_key(API_KEY),
        TextLocalCredentials.from_password("shop@example.com", PASSWORD),
        TextLocalCredentials.from_hash("shop@example.com", PASSWORD_HASH),
    ]
    shown = [repr(c) + str(c) for c in credentials]
    shown += [repr(TextLocalClient(TextLocalSettings(), c)) for c in credentials]
    shown.append(repr(TextLocalSettings()))
    for text in shown:
        for secret in SECRETS:
            assert secret not in text
    assert "shop@example.com" in shown[1]


def test_api_url_is_checked_and_normalised() -> None:
    """The API URL gains a trailing slash; credentials or a query in it are refused unechoed."""
    assert TextLocalSettings(api_url="http://127.0.0.1:8080/api").api_url == (
        "http://127.0.0.1:8080/api/"
    )
    for bad in (f"https://user:{PASSWORD}@api.txtlocal.com/", "https://x/?apikey=1", "ftp://x/"):
        with pytest.raises(ConfigError) as raised:
            TextLocalSettings(api_url=bad)
        assert raised.value.setting == "textlocal.api_url"
        assert PASSWORD not in str(raised.value)


@pytest.mark.parametrize(
    ("fields", "setting"),
    [
        ({"connect_timeout_s": 0.0}, "textlocal.connect_timeout_s"),
        ({"connect_timeout_s": 5.0, "request_timeout_s": 5.5}, "textlocal.request_timeout_s"),
        ({"rate_limit_per_s": 0.0}, "textlocal.rate_limit_per_s"),
        ({"max_concurrency": 0}, "textlocal.max_concurrency"),
        ({"max_attempts": 0}, "textlocal.max_attempts"),
    ],
)
def test_settings_validation_names_the_setting(fields: dict[str, float], setting: str) -> None:
    """Each impossible setting is refused by name."""
    with pytest.raises(ConfigError) as raised:
        TextLocalSettings(**fields)  # type: ignore[arg-type]
    assert raised.value.setting == setting


# --- what goes on the wire --------------------------------------------------------------------


async def test_send_on_the_wire(server: ScriptedServer) -> None:
    """send POSTs a urlencoded form to {api_url}send/, message and sender encoded once more."""
    server.default = success(batch_id=1, num_messages=1, cost=1, balance=9)
    schedule = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with open_client(server.url) as client:
        await client.send(
            message="Hi & bye 50%+ £",
            group_id=31,
            sender="Shop & Co",
            schedule_time=schedule,
            custom="c-1",
            optouts=True,
            receipt_url="https://example.com/r",
        )
    request = server.requests[0]
    assert (request.method, request.path) == ("POST", "/send/")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = request.form
    assert form["apikey"] == API_KEY
    assert unquote(form["message"]) == "Hi & bye 50%+ £"
    assert "+" not in form["message"]
    assert " " not in form["message"]
    assert unquote(form["sender"]) == "Shop & Co"
    assert form["group_id"] == "31"
    assert form["schedule_time"] == str(int(schedule.timestamp()))
    assert (form["custom"], form["optouts"], form["receipt_url"]) == (
        "c-1",
        "true",
        "https://example.com/r",
    )
    assert not {"test", "numbers", "unicode"} & form.keys()


async def test_get_optouts_on_the_wire(server: ScriptedServer) -> None:
    """get_optouts sends `time` as Unix seconds when given (nothing otherwise) and answers typed
    opt-outs whose repr carries no number."""
    server.default = success(
        optouts=[{"id": 7, "number": int(NUMBER), "datetime": "2025-03-05 09:10:11"}],
        num_optouts=1,
    )
    since = datetime(2025, 3, 4, 9, 0, tzinfo=UTC)
    async with open_client(server.url) as client:
        [optout] = await client.get_optouts(since=since)
        await client.get_optouts()
    assert (optout.number, optout.optout_id) == (NUMBER, 7)
    assert optout.opted_out_at == datetime(2025, 3, 5, 9, 10, 11, tzinfo=UTC)
    assert NUMBER not in repr(optout)
    first, second = server.requests
    assert first.path == "/get_optouts/"
    assert first.form["time"] == str(int(since.timestamp()))
    assert "time" not in second.form


async def test_send_to_numbers_on_the_wire(server: ScriptedServer) -> None:
    """Numbers go as one comma list; test and unicode flags as true; validity as Unix seconds."""
    server.default = success(test_mode=True, num_messages=2, cost=2, balance=9)
    validity = datetime(2030, 1, 1, tzinfo=UTC)
    async with open_client(server.url) as client:
        result = await client.send(
            message="x", numbers=[NUMBER, 447700900124], test=True, unicode=True, validity=validity
        )
    form = server.requests[0].form
    assert form["numbers"] == f"{NUMBER},447700900124"
    assert (form["test"], form["unicode"]) == ("true", "true")
    assert form["validity"] == str(int(validity.timestamp()))
    assert result.test_mode
    assert result.batch_id is None


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"group_id": 1, "numbers": [NUMBER]},
        {"numbers": []},
        {"numbers": [f"+{NUMBER}"]},
        {"numbers": [NUMBER] * 10_001},
        {"group_id": 1, "schedule_time": datetime(2030, 1, 1)},  # naive on purpose
    ],
)
async def test_send_refuses_bad_arguments_before_calling(
    server: ScriptedServer, arguments: dict[str, object]
) -> None:
    """Structurally wrong sends raise ValueError (no number echoed) and make no request."""
    async with open_client(server.url) as client:
        with pytest.raises(ValueError, match=r"^[^0-9]*$|10000") as raised:
            await client.send(message="x", **arguments)  # type: ignore[arg-type]
    assert NUMBER not in str(raised.value)
    assert server.requests == []


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        (
            TextLocalCredentials.from_password("me", PASSWORD),
            {"username": "me", "password": PASSWORD},
        ),
        (
            TextLocalCredentials.from_hash("me", PASSWORD_HASH),
            {"username": "me", "hash": PASSWORD_HASH},
        ),
    ],
)
async def test_username_logins_on_the_wire(
    server: ScriptedServer, credentials: TextLocalCredentials, expected: dict[str, str]
) -> None:
    """A username login sends username with password or hash, and no API key."""
    async with open_client(server.url, credentials=credentials) as client:
        await client.balance()
    form = server.requests[0].form
    assert {k: form[k] for k in expected} == expected
    assert "apikey" not in form


async def test_contacts_bulk_is_bounded_and_sent_as_json(server: ScriptedServer) -> None:
    """Over 1,500 contacts raise before any call; an empty list makes no call; else JSON goes."""
    server.default = success(group_id=31, num_contacts=2)
    async with open_client(server.url) as client:
        with pytest.raises(ValueError, match="1500"):
            await client.create_contacts_bulk(31, [NewContact(NUMBER)] * 1501)
        assert await client.create_contacts_bulk(31, []) == 0
        assert server.requests == []
        added = await client.create_contacts_bulk(
            31, [NewContact(NUMBER, "Ann & Co", custom1="C+1"), NewContact("447700900124")]
        )
    assert added == 2
    contacts = json.loads(server.requests[0].form["contacts"])
    assert contacts[0] == {
        "number": NUMBER,
        "first_name": "Ann & Co",
        "last_name": "",
        "custom1": "C+1",
        "custom2": "",
        "custom3": "",
    }


async def test_calls_before_open_are_refused() -> None:
    """A client used outside `async with` says so instead of failing obscurely."""
    client = TextLocalClient(TextLocalSettings(), TextLocalCredentials.from_api_key(API_KEY))
    with pytest.raises(RuntimeError, match="not open"):
        await client.balance()


# --- error mapping and retries -----------------------------------------------------------------


async def test_api_errors_are_permanent(server: ScriptedServer) -> None:
    """A TextLocal error code becomes TextLocalApiError with code and message, not retried."""
    server.default = failure(10, "Invalid group ID")
    observer = RecordingObserver()
    async with open_client(server.url, observer=observer) as client:
        with pytest.raises(TextLocalApiError) as raised:
            await client.get_contacts(999)
    assert (raised.value.code, raised.value.message, raised.value.command) == (
        10,
        "Invalid group ID",
        "get_contacts",
    )
    assert len(server.requests) == 1
    assert observer.finished == [("get_contacts", "api_error")]
    assert_no_secrets(raised.value)


@pytest.mark.parametrize("http_status", [400, 401, 403, 404, 413])
@pytest.mark.parametrize("command", ["send", "balance"])
async def test_a_4xx_refusal_is_permanent(
    server: ScriptedServer, command: str, http_status: int
) -> None:
    """A 4xx other than 408 and 429 is TextLocalHttpError after one request: never retried."""
    server.default = Reply({}, status=http_status)
    observer = RecordingObserver()
    async with open_client(server.url, observer=observer) as client:
        call = client.send(message="x", numbers=[NUMBER]) if command == "send" else client.balance()
        with pytest.raises(TextLocalHttpError) as raised:
            await call
    assert isinstance(raised.value, PermanentError)
    assert (raised.value.command, raised.value.http_status) == (command, http_status)
    assert len(server.requests) == 1
    assert observer.finished == [(command, "http_error")]
    assert observer.retries == []
    assert_no_secrets(raised.value)


@pytest.mark.parametrize("command", ["send", "balance"])
async def test_503_408_and_429_are_retried_for_every_command(
    server: ScriptedServer, command: str
) -> None:
    """503, 408 and 429 mean TextLocal did nothing, so even send is retried; Retry-After obeyed."""
    reply = success(batch_id=5, num_messages=1, cost=1, balance=1) if command == "send" else BALANCE
    server.script = [
        Reply({}, status=503),
        Reply({}, status=408),
        Reply({}, status=429, headers={"Retry-After": "3"}),
    ]
    server.default = reply
    observer = RecordingObserver()
    async with open_client(server.url, observer=observer) as client:
        if command == "send":
            assert (await client.send(message="x", group_id=1)).batch_id == 5
        else:
            assert (await client.balance()).sms == 100.0
    assert len(server.requests) == 4
    assert [outcome for _, outcome in observer.finished] == [
        "unavailable",
        "unavailable",
        "rate_limited",
        "ok",
    ]
    assert [reason for _, reason, _ in observer.retries] == [
        "TextLocalUnavailable",
        "TextLocalUnavailable",
        "TextLocalRateLimited",
    ]
    assert observer.retries[2][2] == 3.0


async def test_500_on_send_is_an_unknown_outcome(server: ScriptedServer) -> None:
    """A 500 may come after TextLocal acted: send reports an unknown outcome, once."""
    server.default = Reply({}, status=500)
    observer = RecordingObserver()
    async with open_client(server.url, observer=observer) as client:
        with pytest.raises(TextLocalOutcomeUnknown) as raised:
            await client.send(message="x", numbers=[NUMBER])
    assert len(server.requests) == 1
    assert observer.finished == [("send", "outcome_unknown")]
    assert_no_secrets(raised.value)


async def test_500_on_a_read_is_retried(server: ScriptedServer) -> None:
    """A 500 on a read is transient: retried, then answered."""
    server.script = [Reply({}, status=500), Reply({}, status=502)]
    async with open_client(server.url) as client:
        assert (await client.balance()).sms == 100.0
    assert len(server.requests) == 3


@pytest.mark.parametrize("unsafe", sorted(UNSAFE_TO_REPEAT))
async def test_a_dropped_reply_to_an_unsafe_call_is_an_unknown_outcome(
    server: ScriptedServer, unsafe: str
) -> None:
    """When the connection drops after the request was sent, unsafe calls are not repeated."""
    server.default = Drop()
    calls: dict[str, Callable[[TextLocalClient], object]] = {
        "send": lambda c: c.send(message="x", group_id=1),
        "bulk_json": lambda c: c.bulk_json([(NUMBER, "x")]),
        "create_group": lambda c: c.create_group("g"),
        "delete_group": lambda c: c.delete_group(3),
        "cancel_scheduled": lambda c: c.cancel_scheduled(3),
    }
    async with open_client(server.url) as client:
        with pytest.raises(TextLocalOutcomeUnknown) as raised:
            await calls[unsafe](client)  # type: ignore[misc]
    assert raised.value.command == unsafe
    assert server.commands() == [unsafe]
    assert_no_secrets(raised.value)


async def test_a_dropped_reply_to_a_safe_call_is_retried(server: ScriptedServer) -> None:
    """Reads and create_contacts_bulk are repeated after a dropped reply."""
    server.script = [Drop(), Drop()]
    server.default = success(group_id=31, num_contacts=1, groups=[])
    async with open_client(server.url) as client:
        assert await client.get_groups() == []
        server.script = [Drop()]
        assert await client.create_contacts_bulk(31, [NewContact(NUMBER)]) == 1
    assert server.commands() == ["get_groups"] * 3 + ["create_contacts_bulk"] * 2


async def test_logs_carry_no_secrets_numbers_or_bodies(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's log lines (retries, unknown outcomes, requests) show none of those."""
    server.script = [Reply({}, status=503), Drop()]
    caplog.set_level(logging.DEBUG, logger="consumer.textlocal")
    async with open_client(server.url) as client:
        with pytest.raises(TextLocalOutcomeUnknown):
            await client.send(message="Body-Text-XYZ", numbers=[NUMBER])
        await client.balance()
    events = [record.getMessage() for record in caplog.records]
    assert events == [
        "textlocal.request_finished",
        "textlocal.retry_scheduled",
        "textlocal.outcome_unknown",
        "textlocal.request_finished",
    ]
    for record in caplog.records:
        shown = f"{record.getMessage()} {vars(record)}"
        for private in (*SECRETS, NUMBER, "Body-Text-XYZ"):
            assert private not in shown


async def test_a_timeout_on_send_is_an_unknown_outcome(server: ScriptedServer) -> None:
    """A send whose reply does not come within the request timeout is not repeated."""
    server.default = Stall(5.0)
    async with open_client(server.url, connect_timeout_s=0.1, request_timeout_s=1.1) as client:
        with pytest.raises(TextLocalOutcomeUnknown, match="timed out") as raised:
            await client.send(message="x", group_id=1)
    assert len(server.requests) == 1
    assert_no_secrets(raised.value)


async def test_a_timeout_on_a_read_is_retried(server: ScriptedServer) -> None:
    """A read that times out is tried again."""
    server.script = [Stall(5.0)]
    server.default = success(batch_id=9, num_messages=2, num_delivered=2)
    async with open_client(server.url, connect_timeout_s=0.1, request_timeout_s=1.1) as client:
        status = await client.status_batch(9)
    assert (status.batch_id, status.delivered, status.pending) == (9, 2, 0)
    assert len(server.requests) == 2


async def test_connection_refused_is_retried_even_for_send() -> None:
    """A refused connection sent nothing: send is retried, then reported unavailable."""
    observer = RecordingObserver()
    async with open_client(
        f"http://127.0.0.1:{free_port()}/", observer=observer, max_attempts=3
    ) as client:
        with pytest.raises(TextLocalUnavailable) as raised:
            await client.send(message="x", numbers=[NUMBER])
    assert not isinstance(raised.value, TextLocalOutcomeUnknown)
    assert "cannot connect" in raised.value.reason
    assert observer.finished == [("send", "unavailable")] * 3
    assert_no_secrets(raised.value)


async def test_an_unreadable_reply(server: ScriptedServer) -> None:
    """A 200 that is not TextLocal's JSON: unknown outcome for send, retried for a read."""
    server.script = [RawReply(b"<html>proxy error</html>"), RawReply(b'{"status": "weird"}')]
    async with open_client(server.url) as client:
        with pytest.raises(TextLocalOutcomeUnknown, match="malformed reply") as raised:
            await client.send(message="x", group_id=1)
        assert (await client.balance()).sms == 100.0
    assert server.commands() == ["send", "balance", "balance"]
    assert_no_secrets(raised.value)


async def test_retries_stop_after_max_attempts(server: ScriptedServer) -> None:
    """A service that stays unavailable is reported after max_attempts tries."""
    server.default = Reply({}, status=503)
    async with open_client(server.url, max_attempts=3) as client:
        with pytest.raises(TextLocalUnavailable) as raised:
            await client.get_templates()
    assert raised.value.http_status == 503
    assert len(server.requests) == 3
    assert_no_secrets(raised.value)


async def test_a_long_retry_after_is_handed_to_the_caller(server: ScriptedServer) -> None:
    """A Retry-After beyond the retry budget ends the retries, carrying the wait to the caller."""
    server.default = Reply({}, status=429, headers={"Retry-After": "600"})
    async with open_client(server.url, max_total_s=30.0) as client:
        with pytest.raises(TextLocalRateLimited) as raised:
            await client.balance()
    assert raised.value.retry_after_s == 600.0
    assert len(server.requests) == 1


# --- limits ----------------------------------------------------------------------------------


async def test_concurrency_is_capped_across_calls(server: ScriptedServer) -> None:
    """No more requests are in flight than max_concurrency, whichever calls make them."""
    server.hold_s = 0.05
    server.default = success(balance={"sms": 1}, groups=[], templates=[])
    async with open_client(server.url, max_concurrency=2) as client:
        await asyncio.gather(
            *(client.balance() for _ in range(3)),
            *(client.get_groups() for _ in range(3)),
            *(client.get_templates() for _ in range(2)),
        )
    assert len(server.requests) == 8
    assert server.max_in_flight == 2


async def test_rate_limit_is_shared_by_all_calls(server: ScriptedServer) -> None:
    """Requests from concurrent calls of different commands start at least 1/rate apart."""
    server.default = success(balance={"sms": 1}, groups=[])
    async with open_client(
        server.url, rate_limit_per_s=20.0, max_concurrency=8, sleep=asyncio.sleep
    ) as client:
        await asyncio.gather(
            *(client.balance() for _ in range(3)), *(client.get_groups() for _ in range(3))
        )
    gaps = [b - a for a, b in zip(server.arrivals_s, server.arrivals_s[1:], strict=False)]
    assert len(server.arrivals_s) == 6
    assert min(gaps) > 0.04  # 1/20 s, less scheduling jitter
    assert server.arrivals_s[-1] - server.arrivals_s[0] >= 0.24


# --- paging ----------------------------------------------------------------------------------


def contacts_page(start: int, count: int) -> Reply:
    contacts = [
        {"number": 447700900000 + start + n, "custom1": f"C{start + n}"} for n in range(count)
    ]
    return success(group_id=7, start=start, limit=2, num_contacts=5, contacts=contacts)


async def test_iter_contacts_pages_until_a_short_page(server: ScriptedServer) -> None:
    """iter_contacts asks page after page and stops at the first short one."""
    server.script = [contacts_page(0, 2), contacts_page(2, 2), contacts_page(4, 1)]
    async with open_client(server.url) as client:
        pages = [page async for page in client.iter_contacts(7, page_size=2)]
    assert [[c.custom1 for c in page] for page in pages] == [["C0", "C1"], ["C2", "C3"], ["C4"]]
    assert [r.form["start"] for r in server.requests] == ["0", "2", "4"]
    assert {r.form["limit"] for r in server.requests} == {"2"}


async def test_iter_history_stops_at_the_total(server: ScriptedServer) -> None:
    """iter_history_group stops once it has read the reported total, even on a full page."""
    entry = {"batch_id": 1, "group_id": 7, "datetime": "2025-03-01 08:00:00", "num_credits": 1}
    server.script = [
        success(messages=[entry, entry], start=0, limit=2, total=4),
        success(messages=[entry, entry], start=2, limit=2, total=4),
    ]
    since = datetime(2025, 1, 1, tzinfo=UTC)
    async with open_client(server.url) as client:
        pages = [p async for p in client.iter_history_group(min_time=since, page_size=2)]
    assert [len(page) for page in pages] == [2, 2]
    assert [r.form["start"] for r in server.requests] == ["0", "2"]
    assert server.requests[0].form["min_time"] == str(int(since.timestamp()))
    assert server.requests[0].form["sort_order"] == "desc"


# --- a million recipients ----------------------------------------------------------------------


def million_recipient_status_reply() -> Iterable[bytes]:
    yield b'{"batch_id":4242,"num_messages":1000000,"num_delivered":990000,"num_undelivered":1000,'
    yield b'"num_unknown":0,"num_invalid":10,"num_expired":0,"messages":['
    for first in range(0, 1_000_000, 2000):
        entries = ",".join(
            f'{{"recipient":{447_700_000_000 + n},"status":"D"}}'
            for n in range(first, first + 2000)
        )
        yield (b"," if first else b"") + entries.encode()
    yield b'],"status":"success"}'


async def test_million_recipient_replies_over_http_stay_small(server: ScriptedServer) -> None:
    """send and status_batch for 1M recipients return the right counts without holding the list."""
    # Produced before tracing starts, so the peak below is the client's reading alone.
    send_reply = list(million_recipient_send_reply(1_000_000))
    status_reply = list(million_recipient_status_reply())
    server.script = [Stream(lambda: send_reply), Stream(lambda: status_reply)]
    async with open_client(server.url, request_timeout_s=60.0) as client:
        tracemalloc.start()
        started = time.perf_counter()
        try:
            sent = await client.send(message="x", group_id=1)
            status = await client.status_batch(4242)
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        elapsed_s = time.perf_counter() - started
    reply_mb = sum(map(len, send_reply + status_reply)) / 1e6
    print(
        f"\n1M-recipient send + status_batch replies ({reply_mb:.0f} MB) over HTTP: "
        f"{elapsed_s:.1f}s, peak traced allocation {peak_bytes / 1e6:.2f} MB"
    )
    assert (sent.batch_id, sent.num_messages, sent.cost, sent.balance) == (
        4242,
        1_000_000,
        1_000_000.0,
        1234.5,
    )
    assert (status.num_messages, status.delivered, status.undelivered, status.invalid) == (
        1_000_000,
        990_000,
        1000,
        10,
    )
    assert status.pending == 1_000_000 - 990_000 - 1000 - 10
    assert peak_bytes < 5_000_000


# --- per-message statuses ---------------------------------------------------------------------


@pytest.mark.integration
async def test_slow_visits_of_a_status_report_cannot_time_it_out(sandbox: SandboxHandle) -> None:
    """Visiting a 50,000-message report (2 MB, more than the socket buffers hold) takes longer
    than the request timeout, yet it is read once and every message visited once: the visits
    run after the reply is read."""
    first, count = 447_800_000_000, 50_000
    await sandbox.admin.set_balance(sms=count)
    group_id = await sandbox.admin.generate_contacts("Slow visits", count, first_number=first)
    credentials = TextLocalCredentials.from_api_key(sandbox.api_key)
    runs: list[MessageStatuses] = []

    async def slow_visit(run: MessageStatuses) -> None:
        """As slow as Redis work far away: 50 ms per run of about 1,600 messages."""
        runs.append(run)
        await asyncio.sleep(0.05)

    async with open_client(
        sandbox.url, credentials=credentials, connect_timeout_s=0.1, request_timeout_s=1.1
    ) as client:
        sent = await client.send(message="Hi", group_id=group_id)
        assert sent.batch_id is not None
        await sandbox.admin.reset_call_counts()
        started = time.perf_counter()
        status = await client.status_batch_messages(sent.batch_id, slow_visit)
        elapsed_s = time.perf_counter() - started
    assert elapsed_s > 1.1, "the visits should outlast the request timeout"
    assert status.num_messages == count
    numbers = [number for run in runs for number in run.numbers]
    assert sorted(numbers) == [str(first + i) for i in range(count)]
    assert all(len(run.numbers) == len(run.statuses) for run in runs)
    assert (await sandbox.admin.call_counts()).get("status_batch") == 1
