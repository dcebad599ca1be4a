"""Every Prometheus metric the daemon exposes, in one place (DESIGN §7).

Names follow `textlocal_consumer_<what>_<unit>`: counters end in `_total`, durations are
`_seconds`, timestamps `_timestamp_seconds`. Labels are bounded: event type, reason code, state,
TextLocal command and outcome, delivery status letter, job name, partition number. The registry is
passed in, so tests read a fresh one with `get_sample_value`; the process (`process_*`), platform
(`python_info`) and garbage-collector (`python_gc_*`) collectors are registered on it too.

The alert rules (deploy/prometheus/alerts.yaml) count increases of some counters. Prometheus does
not count a series' first sample as an increase, so a labelled series created at its first
event would hide that event: the labels they watch are created at 0 up front (every campaign
state here; the dead-letter reasons in intake; the work roles and outbox kinds where those are
built).
"""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from consumer.workflow import CampaignState

PREFIX = "textlocal_consumer"

# TextLocal calls take from tens of milliseconds to several seconds for large reports.
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A turn under the rate limit comes at once when the account is idle, after about one interval
# per caller ahead when it is busy, and up to the limiter's give-up time while Redis is away.
_RATE_LIMIT_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The daemon's metrics, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=registry)

        # intake
        self.events_consumed = counter(
            "events_consumed_total", "Input events decoded, by type.", ("type",)
        )
        self.events_rejected = counter(
            "events_rejected_total",
            "Input events refused with a REJECTED status, by type and reason code.",
            ("type", "reason"),
        )
        self.events_dead_lettered = counter(
            "events_dead_lettered_total",
            "Input records sent to the dead-letter topic, by reason.",
            ("reason",),
        )
        self.events_duplicate = counter(
            "events_duplicate_total", "Input events ignored as already seen, by type.", ("type",)
        )
        self.consumer_lag = gauge(
            "consumer_lag_messages",
            "Messages behind the partition end (librdkafka statistics).",
            ("topic", "partition"),
        )
        self.partitions_assigned = gauge(
            "partitions_assigned", "Input partitions assigned to this replica."
        )
        # campaigns
        self.campaigns = gauge(
            "campaigns", "Campaigns known in Redis, by state (refreshed periodically).", ("state",)
        )
        self.campaign_transitions = counter(
            "campaign_transitions_total",
            "Campaign state changes made here, by new state.",
            ("state",),
        )
        for state in CampaignState:
            self.campaign_transitions.labels(state.value)
        self.sms_accepted = counter(
            "sms_accepted_total", "Messages TextLocal accepted for sending (num_messages)."
        )
        self.credits_spent = counter("credits_spent_total", "Credits TextLocal charged for sends.")
        self.contacts_loaded = counter(
            "contacts_loaded_total", "Contacts loaded into campaign segments."
        )
        self.unmatched_customers = counter(
            "unmatched_customers_total",
            "Targeted customers not sent to, by reason (unmatched, invalid_number).",
            ("reason",),
        )
        # TextLocal
        self.textlocal_request_duration = Histogram(
            f"{PREFIX}_textlocal_request_duration_seconds",
            "TextLocal API calls, by command and outcome.",
            ("command", "outcome"),
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.textlocal_retries = counter(
            "textlocal_retries_total",
            "TextLocal calls retried, by command and reason.",
            ("command", "reason"),
        )
        self.textlocal_rate_limit_wait = Histogram(
            f"{PREFIX}_textlocal_rate_limit_wait_seconds",
            "Time each TextLocal request waited for a turn under the account's shared rate limit.",
            buckets=_RATE_LIMIT_WAIT_BUCKETS,
            registry=registry,
        )
        self.textlocal_rate_limit_unavailable = counter(
            "textlocal_rate_limit_unavailable_total",
            "Times Redis did not answer the shared rate limit (no TextLocal call went out then).",
        )
        self.textlocal_credit_balance = gauge(
            "textlocal_credit_balance",
            "The TextLocal account's credits at its last balance check here, by kind (sms, mms).",
            ("kind",),
        )
        self.textlocal_credit_balance_checked = gauge(
            "textlocal_credit_balance_checked_timestamp_seconds",
            "When this replica last checked the TextLocal balance (Unix time; the replica that "
            "checked last has the current balance).",
        )
        # delivery polls
        self.polls = counter("polls_total", "Delivery polls, by outcome.", ("outcome",))
        self.polls_overdue = gauge(
            "polls_overdue", "Delivery polls past their due time and not yet done."
        )
        self.delivery_outcomes = counter(
            "delivery_outcomes_total",
            "Final delivery outcome of sent messages (at each window's last poll), by status.",
            ("status",),
        )
        # delivery receipts (consumer.receipts, consumer.receipt_outcomes)
        self.receipts = counter(
            "receipts_total",
            "Requests to the receipt listener, by result (accepted, duplicate, "
            "unknown_reference, backlog_full, unavailable, malformed, bad_token, "
            "method_not_allowed).",
            ("result",),
        )
        self.receipts_backlog = gauge(
            "receipts_backlog", "Receipts recorded in Redis, not yet turned into outcomes."
        )
        self.receipts_applied = counter(
            "receipts_applied_total",
            "Recorded receipts handled by the drain, by result (outcome: a customer's first "
            "final outcome; no_change: already final or not a recipient; left_to_poll: U, which "
            "may be an expiry; campaign_gone; given_up).",
            ("result",),
        )
        self.customer_outcomes = counter(
            "customer_outcomes_total",
            "Customers whose outcome was published in CustomerOutcomes, by outcome and source "
            "(poll, receipt).",
            ("outcome", "source"),
        )
        # opt-outs (the daily opt-out import)
        self.optouts_read = counter(
            "optouts_read_total", "Opt-outs read from TextLocal for the first time."
        )
        self.optouts_published = counter(
            "optouts_published_total",
            "CustomerOptOut records recorded for publishing (one per opt-out, group and customer).",
        )
        self.optouts_unmatched = counter(
            "optouts_unmatched_total",
            "Opt-outs whose number no configured contact group's customer holds (not published).",
        )
        # coordination and jobs
        self.leases_held = gauge(
            "leases_held", "Redis leases this replica holds, by kind.", ("kind",)
        )
        self.daily_job_last_success = gauge(
            "daily_job_last_success_timestamp_seconds",
            "When each daily job last finished successfully (Unix time).",
            ("daily_job",),
        )
        self.daily_job_runs = counter(
            "daily_job_runs_total", "Daily job runs, by job and outcome.", ("daily_job", "outcome")
        )
        self.outbox_pending = gauge(
            "outbox_pending_events", "Output events recorded in Redis, not yet published."
        )
        self.events_published = counter(
            "events_published_total", "Output events published to Kafka, by topic kind.", ("kind",)
        )
        self.handler_failures = counter(
            "handler_failures_total",
            "Leased work items whose handler raised an unexpected error, by role.",
            ("role",),
        )
        self.handler_gave_up = counter(
            "handler_gave_up_total",
            "Work items ended FAILED INTERNAL_ERROR after repeated handler failures, by role.",
            ("role",),
        )
        self.outbox_set_aside = counter(
            "outbox_set_aside_total",
            "Output events Kafka refused permanently, set aside in Redis, by topic kind.",
            ("kind",),
        )
        self.dependency_up = gauge(
            "dependency_up",
            "Whether a dependency (redis, kafka) answers its probe (1) or not.",
            ("dependency",),
        )
        self.dependency_outages = counter(
            "dependency_outages_total",
            "Outages of a dependency (redis, kafka) seen.",
            ("dependency",),
        )
        self.role_restarts = counter(
            "role_restarts_total",
            "Roles restarted in-process after an unexpected error.",
            ("role",),
        )
        self.work_oldest_running = gauge(
            "work_oldest_running_seconds",
            "How long the longest-running item in hand here has been running, by kind "
            "(campaign: an executor step; poll: a delivery poll); 0 when none runs.",
            ("kind",),
        )
        self.loop_last_iteration = gauge(
            "loop_last_iteration_timestamp_seconds",
            "When each role's loop last completed an iteration (Unix time).",
            ("role",),
        )

    # --- adapters for the I/O modules' observer protocols -----------------------------------

    def request_finished(self, command: str, outcome: str, duration_s: float) -> None:
        self.textlocal_request_duration.labels(command, outcome).observe(duration_s)

    def retry_scheduled(self, command: str, reason: str, delay_s: float) -> None:
        self.textlocal_retries.labels(command, reason).inc()

    def balance_checked(self, sms: float, mms: float, at_s: float) -> None:
        self.textlocal_credit_balance.labels("sms").set(sms)
        self.textlocal_credit_balance.labels("mms").set(mms)
        self.textlocal_credit_balance_checked.set(at_s)

    def rate_limit_waited(self, wait_s: float) -> None:
        self.textlocal_rate_limit_wait.observe(wait_s)

    def rate_limit_unavailable(self) -> None:
        self.textlocal_rate_limit_unavailable.inc()

    def partition_lag(self, topic: str, partition: int, lag: int) -> None:
        self.consumer_lag.labels(topic, str(partition)).set(lag)

    def assignment_changed(self, assigned: int) -> None:
        self.partitions_assigned.set(assigned)

    def partition_revoked(self, topic: str, partition: int) -> None:
        # Another replica reports this partition's lag now; a stale value here would mislead.
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(topic, str(partition))
