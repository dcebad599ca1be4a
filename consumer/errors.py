"""The product's exception tree: every error the daemon raises on purpose is one of these.

    ConsumerError
    ├── ConfigError                  a setting is missing or wrong (names the setting)
    ├── CodecError                   bytes that are not a record we can decode
    ├── TransientError               worth retrying later: nothing was applied, or it is safe again
    │   ├── TextLocalUnavailable     network error, timeout, HTTP 5xx or 408 from TextLocal
    │   │   └── TextLocalRateLimited HTTP 429; carries retry_after_s when TextLocal sent one
    │   ├── StoreUnavailable         Redis could not be reached
    │   │   └── RateLimitUnavailable the shared TextLocal rate limit stayed out of reach (Redis):
    │   │                            no TextLocal call was made
    │   ├── KafkaUnavailable         Kafka refused or timed out a produce, commit or admin call
    │   └── ContactIndexMissing      a contact group has no index yet (its refresh has not run)
    ├── PermanentError               retrying will not help
    │   ├── KafkaRecordRefused       Kafka refuses records for good (too large, bad topic, ACL)
    │   ├── TextLocalApiError        TextLocal answered "failure" with an error code
    │   └── TextLocalHttpError       HTTP 4xx other than 408 and 429: the request itself is refused
    └── TextLocalOutcomeUnknown      a non-repeatable call (send) may or may not have been applied:
                                     the caller must reconcile with TextLocal before trying again

Library exceptions (aiohttp, redis-py, confluent-kafka) are translated into these where they enter
the product (`raise ... from exc`), so nothing above the I/O edges handles a library's types.
Messages never contain secrets, phone numbers or message bodies.
"""

from __future__ import annotations


class ConsumerError(Exception):
    """Base of every error the product raises on purpose."""


class ConfigError(ConsumerError):
    """A configuration setting is missing or invalid."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class CodecError(ConsumerError):
    """Bytes that cannot be decoded into one of our records, with the reason why."""


class TransientError(ConsumerError):
    """A failure that may go away: the operation can be tried again later."""


class TextLocalUnavailable(TransientError):
    """TextLocal could not be reached, or answered with an HTTP error worth retrying.

    Network errors, timeouts, HTTP 5xx and 408 (TextLocal gave up waiting for the request).
    """

    def __init__(self, command: str, reason: str, http_status: int | None = None) -> None:
        super().__init__(f"TextLocal {command}: {reason}")
        self.command = command
        self.reason = reason
        self.http_status = http_status


class TextLocalRateLimited(TextLocalUnavailable):
    """TextLocal answered HTTP 429; `retry_after_s` is its Retry-After, when it gave one."""

    def __init__(self, command: str, retry_after_s: float | None) -> None:
        super().__init__(command, "rate limited (HTTP 429)", http_status=429)
        self.retry_after_s = retry_after_s


class StoreUnavailable(TransientError):
    """Redis could not be reached or timed out."""


class RateLimitUnavailable(StoreUnavailable):
    """The account's shared TextLocal rate limit lives in Redis, and Redis did not answer.

    The limiter fails closed: it waited `waited_s` for Redis (retrying with a capped backoff)
    and then gave up without making the TextLocal call, so nothing was sent unmetered and the
    call is safe to try again later, whatever its command.
    """

    def __init__(self, waited_s: float, reason: str) -> None:
        super().__init__(
            f"TextLocal rate limit: Redis did not answer for {waited_s:.1f}s ({reason}); "
            "no TextLocal call was made"
        )
        self.waited_s = waited_s
        self.reason = reason


class KafkaUnavailable(TransientError):
    """Kafka did not take a record, a commit or an admin request (broker down, timeout)."""


class ContactIndexMissing(TransientError):
    """A contact group has no contact index yet, so numbers cannot be turned into customer ids
    (the daily contact refresh has not succeeded for it); worth trying after the next refresh."""

    def __init__(self, group_id: int) -> None:
        super().__init__(f"contact group {group_id} has no contact index yet")
        self.group_id = group_id


class PermanentError(ConsumerError):
    """A failure that retrying will not fix."""


class KafkaRecordRefused(PermanentError):
    """Kafka refuses these records for good (too large, invalid or unauthorised topic).

    `refused` maps each refused record's position in the batch to Kafka's reason; every other
    record of the batch was acknowledged.
    """

    def __init__(self, refused: dict[int, str]) -> None:
        reasons = sorted(set(refused.values()))
        super().__init__(f"Kafka refused {len(refused)} record(s): {', '.join(reasons)}")
        self.refused = refused


class TextLocalApiError(PermanentError):
    """TextLocal answered `status: failure` with one of its published error codes."""

    def __init__(self, command: str, code: int, message: str) -> None:
        super().__init__(f"TextLocal {command} failed: error {code} {message}")
        self.command = command
        self.code = code
        self.message = message


class TextLocalHttpError(PermanentError):
    """TextLocal refused the request with an HTTP 4xx other than 408 and 429.

    Bad request, authentication, not found, too large: the same request would be refused again.
    """

    def __init__(self, command: str, http_status: int) -> None:
        super().__init__(f"TextLocal {command}: refused with HTTP {http_status}")
        self.command = command
        self.http_status = http_status


class TextLocalOutcomeUnknown(ConsumerError):
    """A call that must not be repeated blindly may have reached TextLocal; its reply was lost.

    Raised instead of a retry for `send` and other non-idempotent commands when the connection
    failed after the request was written (or timed out waiting for the reply).
    """

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"TextLocal {command}: outcome unknown ({reason})")
        self.command = command
        self.reason = reason
