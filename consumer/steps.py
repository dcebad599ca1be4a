"""The executor's steps for one campaign, each idempotent and recorded before the next (DESIGN §4).

    READY ─create segment─► SEGMENT_CREATED ─resolve customers, loading each chunk as it is cut─►
    CONTACTS_LOADED ─(record SEND_PENDING, then send)─► SENT ─► polling (poller.py)

Every record is a fenced transition: it applies only while this replica holds the campaign's
lease and the campaign is in the state the step started from. The one step that must never run
twice, `send`, is preceded by SEND_PENDING with its attempt time; a later owner that finds
SEND_PENDING looks for the send at TextLocal (scheduled sends, then the group's history) and
adopts it, and sends again only when TextLocal has no trace of it after a grace period that
outlasts any request still in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from consumer.chunk_loading import HandOver, load_while_resolving
from consumer.clock import Clock
from consumer.codec import SchemaRegistry
from consumer.contact_index import ContactIndex, MatchedVisitor, Resolution
from consumer.errors import (
    PermanentError,
    TextLocalApiError,
    TextLocalOutcomeUnknown,
    TransientError,
)
from consumer.events import (
    CampaignScheduled,
    CampaignStatusEvent,
    RecipientCounts,
    StatusCode,
    StatusError,
    SubSendSummary,
)
from consumer.fault_points import FaultPoints
from consumer.leased_work import Lease, LeaseLost
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.outbox import status_entry
from consumer.store import CampaignSnapshot, CampaignStore, Transition
from consumer.templates import TemplateCopy
from consumer.textlocal import TextLocalClient
from consumer.workflow import (
    CampaignState,
    ContactGroup,
    contact_group_for,
    message_cost,
    poll_slot,
    render_message,
    segment_group_name,
    short_reference,
)

log = logging.getLogger("consumer.executor")

MULTI = "multi"  # plan_mode of a campaign of several texts (consumer.multi_send)

# TextLocal error codes with a meaning for the workflow.
GROUP_EXISTS = 14
INVALID_GROUP = 10
FINISHED_CAMPAIGN_RETENTION_S = 30 * 24 * 3600

# Contact loaders per `create_contacts_bulk` call a campaign may have in flight
# (`workflow.contact_load_concurrency`): the calls stay at that bound, and while some loaders
# record their chunk loaded, the others' calls keep every slot busy (1M recipients in three
# languages: 1.40–1.45× the floor with two per slot, 1.54–1.60× with one; bench_variants.py).
LOADERS_PER_CALL = 2

_SCAN_PAGE = 10_000


@dataclass(frozen=True)
class StepSettings:
    contact_load_concurrency: int = 4
    poll_interval: timedelta = timedelta(days=1)
    default_window_days: float = 7.0
    # A send closer than this to now goes out at once (TextLocal refuses times in the past).
    schedule_margin: timedelta = timedelta(seconds=30)
    # How long after a send attempt TextLocal may still show it: longer than a request can be
    # in flight (request timeout plus the retries before it), so "no trace" means "not sent".
    send_reconcile_grace: timedelta = timedelta(minutes=3)
    # More distinct promo codes than this in one variant: its texts go out personally.
    max_group_texts: int = 20
    # Messages per bulk_json call for personal texts.
    bulk_chunk_size: int = 1_000
    # Receipts (consumer.receipts): with `receipts`, each send's reference is registered before
    # the send, kept `receipt_retention` past its send time; sends carry `receipt_url` if set.
    receipts: bool = False
    receipt_url: str | None = None
    receipt_retention: timedelta = timedelta(days=10)
    # Record each recipient's number while resolving, for CustomerOutcomes (consumer.outcomes).
    outcomes_enabled: bool = True


# The numbers recorded for CustomerOutcomes outlive the window by this much at most: the final
# poll deletes them, this bounds them for campaigns that never get there (cancelled, failed).
RECIPIENT_NUMBERS_MARGIN = timedelta(days=7)


@dataclass(frozen=True)
class FoundSend:
    """A send for the campaign's segment that TextLocal knows about."""

    batch_id: int
    send_at: datetime
    still_scheduled: bool
    cost: float | None


class CampaignRun:
    """One campaign held under this replica's lease, with its latest snapshot."""

    def __init__(self, snapshot: CampaignSnapshot, lease: Lease) -> None:
        if snapshot.header is None:
            raise ValueError(f"campaign {snapshot.key} has no header")
        self.snapshot = snapshot
        self.header: CampaignScheduled = snapshot.header
        self.lease = lease

    @property
    def key(self) -> str:
        return self.snapshot.key

    def check_lease(self) -> None:
        self.lease.check()


class CampaignSteps:
    """Carries campaigns through their steps against TextLocal; see the module docstring."""

    def __init__(
        self,
        store: CampaignStore,
        index: ContactIndex,
        client: TextLocalClient,
        templates: TemplateCopy,
        registry: SchemaRegistry,
        groups: Sequence[ContactGroup],
        settings: StepSettings,
        clock: Clock,
        metrics: Metrics,
        faults: FaultPoints,
    ) -> None:
        self._store = store
        self._keys = store.keys
        self._index = index
        self._client = client
        self._templates = templates
        self._registry = registry
        self._groups = tuple(groups)
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._faults = faults
        self.registry = registry
        # Imported here: multi_send builds on this module's types.
        from consumer.multi_send import MultiSend

        self.multi = MultiSend(
            self, store, index, client, templates, settings, clock, metrics, faults
        )

    # --- segment -------------------------------------------------------------------------------

    async def create_segment(self, run: CampaignRun) -> None:
        """Create the campaign's group (a deterministic name), or adopt the one it created before.

        The name is recorded before TextLocal is asked. "Already exists" is adopted only when an
        earlier attempt of this campaign recorded that same name (its reply was lost, or the
        process died before recording the id): then the group is provably this campaign's own.
        A group of that name that this campaign never asked for is someone else's, and is never
        sent to.
        """
        if not run.snapshot.plan_mode and not await self.multi.plan(run):
            return  # rejected, or a campaign of several texts (SEGMENT_CREATED now)
        group = self.contact_group(run)
        name = segment_group_name(group, run.header.ref, run.header.event_id)
        attempted_before = run.snapshot.group_name == name
        if not attempted_before:
            await self.record(run, self.fenced(run, CampaignState.READY).set(group_name=name))
        try:
            group_id = (await self._client.create_group(name)).id
        except TextLocalApiError as exc:
            if exc.code != GROUP_EXISTS:
                raise
            if not attempted_before:
                await self.fail(
                    run,
                    StatusError(
                        "SEGMENT_NAME_TAKEN",
                        f"TextLocal already has a group named {name!r} that this campaign "
                        "did not create; it is not used",
                    ),
                    delete_segment=False,
                )
                return
            group_id = await self.existing_group(name)
        except TextLocalOutcomeUnknown:
            # The group may exist now: the next attempt adopts it (create → "exists" → adopt).
            raise TransientError(f"create_group for {run.key}: outcome unknown") from None
        self._faults.reached("segment.created")
        await self.record(
            run,
            self.fenced(run, CampaignState.READY)
            .set_state(CampaignState.SEGMENT_CREATED)
            .set(group_id=group_id, group_name=name),
            CampaignState.SEGMENT_CREATED,
        )
        log_event(log, "campaign.segment_created", campaign=run.key, group_id=group_id)

    async def existing_group(self, name: str) -> int:
        for found in await self._client.get_groups():
            if found.name == name:
                return found.id
        raise TransientError(f"TextLocal says group {name!r} exists but does not list it")

    async def load_contacts(self, run: CampaignRun) -> None:
        """Fill the segment: resolve the customers into chunks and load each as it comes.

        Resolution and loading overlap: a chunk goes to `create_contacts_bulk` (a few in flight)
        as soon as it is resolved, and is recorded when TextLocal accepted it. Resolution is
        deterministic for the recorded contact-index version, so after a restart it runs again
        and only the chunks not yet recorded are loaded. Should that version be gone by then
        (the index was rebuilt over an hour ago), everything is loaded again from the new one:
        contacts added twice to a group are still one contact each.
        """
        if run.snapshot.plan_mode == MULTI:
            await self.multi.load(run)
            return
        version = await self.index_version(run)
        loaded = await self._store.loaded_chunks(run.key)
        calls = asyncio.Semaphore(self._settings.contact_load_concurrency)

        async def load(chunk: tuple[int, str, int]) -> None:
            await self._load_chunk(run, *chunk, calls)

        async def resolve(hand_over: HandOver[tuple[int, str, int]]) -> Resolution:
            async def write_chunk(index: int, payload: str, count: int) -> None:
                if index not in loaded:
                    await hand_over((index, payload, count))

            return await self._index.resolve(
                self._keys.recipients(run.key),
                run.header.batch_count,
                self.contact_group(run),
                version,
                write_chunk,
                run.check_lease,
                on_matched=self.numbers_recorder(run),
            )

        found = await load_while_resolving(
            resolve, load, LOADERS_PER_CALL * self._settings.contact_load_concurrency
        )
        counts = self._counts(run, found)
        if found.matched == 0:
            await self.fail(run, self.nobody(run, counts), counts=counts)
            return
        event = self.status_event(
            run,
            StatusCode.SEGMENT_CREATED,
            counts=counts,
            textlocal_group_id=run.snapshot.group_id,
        )
        await self.record(
            run,
            self.fenced(run, CampaignState.SEGMENT_CREATED)
            .set_state(CampaignState.CONTACTS_LOADED)
            .set(chunks=found.chunks)
            .set_counts(counts)
            .emit(self._keys.outbox, status_entry(self._registry, event)),
            CampaignState.CONTACTS_LOADED,
        )
        self._metrics.unmatched_customers.labels("unmatched").inc(counts.unmatched)
        self._metrics.unmatched_customers.labels("invalid_number").inc(counts.invalid_numbers)
        log_event(
            log,
            "campaign.contacts_loaded",
            campaign=run.key,
            group_id=run.snapshot.group_id,
            chunks=found.chunks,
            **vars(counts),
        )

    def numbers_recorder(
        self, run: CampaignRun, *, keep_existing: bool = False
    ) -> MatchedVisitor | None:
        """What records the recipients' numbers for CustomerOutcomes while resolving (None when
        outcomes are off). They are kept until the window's end (the final poll deletes them),
        at most until `RECIPIENT_NUMBERS_MARGIN` after it. `keep_existing`: see
        `CampaignStore.record_recipient_numbers`."""
        if not self._settings.outcomes_enabled:
            return None
        header = run.header
        window_days = header.metrics_window_days or self._settings.default_window_days
        ends_at = max(header.scheduled_at, self._clock.now()) + timedelta(days=window_days)
        ttl_s = int((ends_at + RECIPIENT_NUMBERS_MARGIN - self._clock.now()).total_seconds())

        async def record(pairs: list[tuple[str, str]]) -> None:
            await self._store.record_recipient_numbers(
                run.key, pairs, ttl_s, keep_existing=keep_existing
            )

        return record

    async def index_version(self, run: CampaignRun) -> str:
        """The contact-index version this campaign resolves against, recorded at first use."""
        group_id = self.contact_group(run).group_id
        recorded = run.snapshot.index_version
        if recorded and await self._index.has_version(group_id, recorded):
            return recorded
        version = await self._index.current_version(group_id)
        if version is None:
            raise TransientError(f"the contact index of group {group_id} is not built yet")
        transition = self.fenced(run, CampaignState.SEGMENT_CREATED).set(index_version=version)
        if recorded:  # its chunks were cut from an index that is gone: load everything again
            transition.delete_key(self._keys.chunks_loaded(run.key))
        await self.record(run, transition)
        return version

    async def _load_chunk(
        self, run: CampaignRun, index: int, payload: str, count: int, calls: asyncio.Semaphore
    ) -> None:
        run.check_lease()
        group_id = run.snapshot.group_id or 0
        async with calls:
            await self._client.create_contacts_bulk_json(group_id, payload, count)
        await self._store.mark_chunk_loaded(run.key, index)
        self._metrics.contacts_loaded.inc(count)
        self._faults.reached("contacts.chunk_loaded")

    def _counts(self, run: CampaignRun, found: Resolution) -> RecipientCounts:
        return RecipientCounts(
            requested=run.snapshot.requested,
            matched=found.matched,
            unmatched=found.unmatched,
            invalid_numbers=found.invalid_numbers,
            duplicates=found.duplicates,
        )

    def nobody(self, run: CampaignRun, counts: RecipientCounts) -> StatusError:
        return StatusError(
            "NO_RECIPIENTS",
            f"none of the {counts.requested} customers has a valid number in contact group "
            f"{self.contact_group(run).group_id}",
        )

    # --- send ----------------------------------------------------------------------------------

    async def send(self, run: CampaignRun) -> None:
        """Check template, text and credits; record SEND_PENDING; then send exactly once."""
        if run.snapshot.plan_mode == MULTI:
            await self.multi.send(run)
            return
        message = run.snapshot.planned_message or await self._legacy_message(run)
        if message is None:
            return
        if isinstance(message, StatusError):
            await self.fail(run, message, status=StatusCode.REJECTED)
            return
        cost = message_cost(message)
        recipients = run.snapshot.matched
        needed = cost.parts * recipients
        if not run.header.test_mode:
            balance = await self._client.balance()
            if balance.sms < needed:
                await self.fail(
                    run,
                    StatusError(
                        "INSUFFICIENT_CREDITS",
                        f"the send needs {needed} credits ({recipients} recipients × "
                        f"{cost.parts} parts); the balance is {balance.sms:g}",
                    ),
                )
                return
        now = self._clock.now()
        scheduled = run.header.scheduled_at > now + self._settings.schedule_margin
        send_at = run.header.scheduled_at if scheduled else now
        await self.record(
            run,
            self.fenced(run, CampaignState.CONTACTS_LOADED)
            .set_state(CampaignState.SEND_PENDING)
            .set(
                send_attempted_at=now,
                send_attempts=run.snapshot.send_attempts + 1,
                message=message,
                message_parts=cost.parts,
                unicode=cost.unicode,
                send_at=send_at,
                scheduled=scheduled,
                estimated_cost=needed,
            ),
            CampaignState.SEND_PENDING,
        )
        await self._call_send(run)

    async def _legacy_message(self, run: CampaignRun) -> str | StatusError | None:
        """The text of a campaign planned by an earlier release (before send plans)."""
        template = await self._templates.lookup(run.header.template_id)
        if template is None:
            await self.fail(
                run,
                StatusError(
                    "UNKNOWN_TEMPLATE",
                    f"template_id {run.header.template_id} is not among TextLocal's templates",
                ),
                status=StatusCode.REJECTED,
            )
            return None
        return render_message(template.body, run.header.promo_codes)

    async def reconcile_send(self, run: CampaignRun) -> None:
        """SEND_PENDING found again: adopt TextLocal's send, or send once it surely has none."""
        if run.snapshot.plan_mode == MULTI:
            await self.multi.send(run)
            return
        found = await self.find_send(run)
        if found is not None:
            log_event(log, "campaign.send_adopted", campaign=run.key, batch_id=found.batch_id)
            await self._record_sent(run, found.batch_id, found.cost, found.send_at)
            return
        now = self._clock.now()
        attempted_at = run.snapshot.send_attempted_at or now
        settles_at = attempted_at + self._settings.send_reconcile_grace
        if now < settles_at:
            raise RetryAt(settles_at, "a send attempt may still be in flight")
        scheduled = run.header.scheduled_at > now + self._settings.schedule_margin
        await self.record(
            run,
            self.fenced(run, CampaignState.SEND_PENDING).set(
                send_attempted_at=now,
                send_attempts=run.snapshot.send_attempts + 1,
                send_at=run.header.scheduled_at if scheduled else now,
                scheduled=scheduled,
            ),
        )
        log_event(log, "campaign.send_retried", logging.WARNING, campaign=run.key)
        await self._call_send(run)

    async def _call_send(self, run: CampaignRun) -> None:
        snapshot = run.snapshot
        scheduled = snapshot.scheduled
        send_at = snapshot.send_at or self._clock.now()
        validity = (
            send_at + timedelta(hours=run.header.validity_hours)
            if run.header.validity_hours
            else None
        )
        custom = await self.send_reference(run, send_at)
        run.check_lease()
        try:
            result = await self._client.send(
                message=snapshot.message,
                group_id=snapshot.group_id or 0,
                sender=run.header.sender or self.contact_group(run).sender,
                schedule_time=send_at if scheduled else None,
                validity=validity,
                custom=custom,
                receipt_url=self.receipt_url,
                optouts=True,
                test=run.header.test_mode,
                unicode=snapshot.unicode,
            )
        except TextLocalOutcomeUnknown:
            log_event(log, "campaign.send_outcome_unknown", logging.WARNING, campaign=run.key)
            await self.reconcile_send(run)
            return
        except TextLocalApiError as exc:
            await self.fail(run, StatusError(f"TEXTLOCAL_{exc.code}", exc.message))
            return
        self._faults.reached("send.returned")
        self._metrics.sms_accepted.inc(result.num_messages)
        self._metrics.credits_spent.inc(result.cost)
        await self._record_sent(run, result.batch_id, result.cost, send_at, result.num_messages)

    async def find_send(self, run: CampaignRun) -> FoundSend | None:
        return await self.find_group_send(
            run.snapshot.group_id or 0, run.snapshot.send_attempted_at
        )

    async def find_group_send(
        self, group_id: int, attempted_at: datetime | None
    ) -> FoundSend | None:
        """A send to `group_id` TextLocal knows: scheduled, or in its history near the attempt."""
        for pending in await self._client.get_scheduled():
            if pending.group_id == group_id:
                return FoundSend(pending.id, pending.scheduled_for, True, None)
        now = self._clock.now()
        attempted_at = attempted_at or now
        async for page in self._client.iter_history_group(
            min_time=attempted_at - timedelta(minutes=10), max_time=now + timedelta(minutes=10)
        ):
            for entry in page:
                if entry.group_id == group_id:
                    return FoundSend(entry.batch_id, entry.sent_at, False, entry.num_credits)
        return None

    async def _record_sent(
        self,
        run: CampaignRun,
        batch_id: int | None,
        cost: float | None,
        send_at: datetime,
        num_messages: int | None = None,
    ) -> None:
        snapshot = run.snapshot
        now = self._clock.now()
        scheduled = send_at > now
        window = timedelta(
            days=run.header.metrics_window_days or self._settings.default_window_days
        )
        first_poll = poll_slot(send_at, self._settings.poll_interval, window, 1)
        status = self.status_event(
            run,
            StatusCode.SCHEDULED if scheduled else StatusCode.SENT,
            textlocal_group_id=snapshot.group_id,
            batch_id=batch_id,
            cost_credits=cost,
            message_parts=snapshot.message_parts,
            send_at=send_at,
        )
        transition = (
            self.fenced(run, CampaignState.SEND_PENDING)
            .set(
                batch_id=batch_id,
                cost=cost,
                num_messages=num_messages,
                sent_at=send_at,
                window_ends_at=send_at + window,
                polls_done=0,
            )
            .dequeue(self._keys.work_queue, run.key)
            .emit(self._keys.outbox, status_entry(self._registry, status))
        )
        if run.header.test_mode or batch_id is None:
            # TextLocal keeps no record of test sends: there is nothing to poll.
            transition.set_state(CampaignState.DONE).set(ended_at=now)
            transition.expire(self._keys.campaign(run.key), FINISHED_CAMPAIGN_RETENTION_S)
            new_state = CampaignState.DONE
        else:
            transition.set_state(CampaignState.SENT)
            transition.enqueue(self._keys.poll_queue, run.key, first_poll.due_at)
            new_state = CampaignState.SENT
        await self.record(run, transition, new_state)
        self._faults.reached("send.recorded")
        log_event(
            log,
            "campaign.sent",
            campaign=run.key,
            batch_id=batch_id,
            scheduled=scheduled,
            recipients=snapshot.matched,
            cost=cost,
        )
        await self.discard_working_data(run.key)
        if new_state == CampaignState.DONE:
            await self.delete_segment(snapshot.group_id)

    # --- cancel --------------------------------------------------------------------------------

    async def cancel(self, run: CampaignRun) -> None:
        """Optimove cancelled: undo what exists at TextLocal, or say it is too late."""
        if run.snapshot.plan_mode == MULTI:
            await self.multi.cancel(run)
            return
        state = run.snapshot.state
        group_id = run.snapshot.group_id
        if state == CampaignState.SEND_PENDING:
            found = await self.find_send(run)
            if found is None:
                now = self._clock.now()
                attempted_at = run.snapshot.send_attempted_at or now
                if now < attempted_at + self._settings.send_reconcile_grace:
                    raise RetryAt(
                        attempted_at + self._settings.send_reconcile_grace,
                        "cancelling: a send attempt may still be in flight",
                    )
            else:
                await self._record_sent(run, found.batch_id, found.cost, found.send_at)
                return  # SENT (or SCHEDULED) now; the cancellation is looked at again
        elif state in (CampaignState.SENT, CampaignState.POLLING):
            batch_id = run.snapshot.batch_id
            send_at = run.snapshot.sent_at
            if (
                batch_id is None
                or send_at is None
                or not await self.cancel_scheduled_send(batch_id, send_at)
            ):
                await self.refuse_cancel(run)
                return
        await self.delete_segment(group_id)
        reason = run.snapshot.cancel_reason or "no reason given"
        await self.fail(
            run,
            StatusError("CANCELLED_BY_OPTIMOVE", reason),
            status=StatusCode.CANCELLED,
            delete_segment=False,
        )

    async def cancel_scheduled_send(self, batch_id: int, send_at: datetime) -> bool:
        """True when the scheduled send is (now) cancelled; False when it went out already."""
        if send_at <= self._clock.now():
            return False
        try:
            await self._client.cancel_scheduled(batch_id)
            return True
        except (TextLocalApiError, TextLocalOutcomeUnknown) as exc:
            # Unknown outcome, or "not found": the list of scheduled sends tells which.
            still_listed = any(s.id == batch_id for s in await self._client.get_scheduled())
            if still_listed:
                raise TransientError(f"cancel_scheduled {batch_id} did not take: {exc}") from exc
            return send_at > self._clock.now()

    async def refuse_cancel(
        self,
        run: CampaignRun,
        detail: str = "the campaign was already sent; it cannot be cancelled",
    ) -> None:
        status = self.status_event(
            run,
            StatusCode.SENT,
            qualifier="cancel-refused",
            batch_id=run.snapshot.batch_id,
            textlocal_group_id=run.snapshot.group_id,
            error=StatusError("CANCEL_TOO_LATE", detail),
        )
        # A poll may move SENT to POLLING meanwhile; the refusal holds in either state.
        transition = self._store.transition(run.key).expect(
            CampaignState.SENT, CampaignState.POLLING
        )
        await self.record(
            run,
            transition.fenced(run.lease.key, run.lease.token)
            .delete_fields(CampaignSnapshot.cancel_requested)
            .dequeue(self._keys.work_queue, run.key)
            .emit(self._keys.outbox, status_entry(self._registry, status)),
        )
        log_event(log, "campaign.cancel_refused", logging.WARNING, campaign=run.key)

    # --- endings -------------------------------------------------------------------------------

    async def fail(
        self,
        run: CampaignRun,
        error: StatusError,
        *,
        status: StatusCode = StatusCode.FAILED,
        counts: RecipientCounts | None = None,
        delete_segment: bool = True,
    ) -> None:
        """End the campaign FAILED, REJECTED or CANCELLED, with its status event."""
        state = {
            StatusCode.FAILED: CampaignState.FAILED,
            StatusCode.REJECTED: CampaignState.REJECTED,
            StatusCode.CANCELLED: CampaignState.CANCELLED,
        }[status]
        event = self.status_event(
            run,
            status,
            counts=counts,
            error=error,
            textlocal_group_id=run.snapshot.group_id,
        )
        await self.record(
            run,
            self.fenced(run, run.snapshot.state)
            .set_state(state)
            .set(
                error_code=error.code,
                error_message=error.message,
                ended_at=self._clock.now(),
            )
            .dequeue(self._keys.work_queue, run.key)
            .dequeue(self._keys.poll_queue, run.key)
            .emit(self._keys.outbox, status_entry(self._registry, event))
            .expire(self._keys.campaign(run.key), FINISHED_CAMPAIGN_RETENTION_S),
            state,
        )
        log_event(
            log,
            "campaign.ended",
            logging.WARNING if status != StatusCode.CANCELLED else logging.INFO,
            campaign=run.key,
            status=status.value,
            reason=error.code,
            detail=error.message,
        )
        await self.discard_working_data(run.key)
        if delete_segment:
            await self._delete_segment_after_end(run)

    async def _delete_segment_after_end(self, run: CampaignRun) -> None:
        """The campaign has ended (recorded): deleting its group is best effort from here on.

        A failure must not look like the campaign's own failure (it would be ended again);
        the group id is logged for the operator instead.
        """
        group_id = run.snapshot.group_id
        try:
            await self.delete_segment(group_id)
        except (PermanentError, TransientError) as exc:
            log_event(
                log,
                "campaign.segment_not_deleted",
                logging.WARNING,
                campaign=run.key,
                group_id=group_id,
                error=str(exc),
            )

    async def delete_segment(self, group_id: int | None) -> None:
        """Delete a campaign's segment group; one already gone is fine."""
        if group_id is None:
            return
        try:
            await self._client.delete_group(group_id)
        except TextLocalApiError as exc:
            if exc.code != INVALID_GROUP:
                raise
        except TextLocalOutcomeUnknown as exc:
            raise TransientError(f"delete_group {group_id}: outcome unknown") from exc
        log_event(log, "campaign.segment_deleted", group_id=group_id)

    async def discard_working_data(self, key: str) -> None:
        """Drop the recipients and loading progress once they cannot be needed again."""
        await self._store.delete_keys(
            self._keys.recipients(key),
            self._keys.batches(key),
            self._keys.chunks_loaded(key),
            self._keys.recipient_codes(key),
            self._keys.distinct_codes(key),
            self._keys.sub_sends(key),
            self._keys.personal_chunks(key),
        )

    # --- helpers -------------------------------------------------------------------------------

    async def send_reference(self, run: CampaignRun, send_at: datetime) -> str:
        """The `custom` reference the campaign's sends carry; with receipts on, registered
        first (so its receipts are accepted) until `receipt_retention` after `send_at`."""
        reference = short_reference(run.header.ref)
        if self._settings.receipts:
            ahead = max(send_at - self._clock.now(), timedelta(0))
            retention = ahead + self._settings.receipt_retention
            await self._store.register_receipt_reference(reference, run.key, retention)
        return reference

    @property
    def receipt_url(self) -> str | None:
        return self._settings.receipt_url

    def contact_group(self, run: CampaignRun) -> ContactGroup:
        group = contact_group_for(run.header.template_name, self._groups)
        if group is None:  # intake checked this; the configuration changed since
            raise TransientError(f"no contact group for template {run.header.template_name!r}")
        return group

    def fenced(self, run: CampaignRun, state: CampaignState) -> Transition:
        """A change of the campaign under its lease. Recording a step ends any run of transient
        failures, so the back-off starts afresh at the next one."""
        return (
            self._store.transition(run.key)
            .expect(state)
            .fenced(run.lease.key, run.lease.token)
            .delete_fields(CampaignSnapshot.failures)
        )

    async def record(
        self, run: CampaignRun, transition: Transition, new_state: CampaignState | None = None
    ) -> None:
        result = await self._store.apply(transition, self._clock.now())
        if not result.ok:
            raise LeaseLost(f"{run.key}: {result.reason}")
        if new_state is not None:
            self._metrics.campaign_transitions.labels(new_state.value).inc()
        fresh = await self._store.load(run.key)
        if fresh is None:
            raise LeaseLost(f"{run.key}: gone")
        run.snapshot = fresh

    def status_event(
        self,
        run: CampaignRun,
        status: StatusCode,
        *,
        qualifier: str = "",
        counts: RecipientCounts | None = None,
        textlocal_group_id: int | None = None,
        batch_id: int | None = None,
        cost_credits: float | None = None,
        message_parts: int | None = None,
        send_at: datetime | None = None,
        error: StatusError | None = None,
        sends: tuple[SubSendSummary, ...] = (),
    ) -> CampaignStatusEvent:
        snapshot = run.snapshot
        return CampaignStatusEvent(
            ref=run.header.ref,
            status=status,
            occurred_at=self._clock.now(),
            qualifier=qualifier,
            counts=counts or snapshot.counts(),
            textlocal_group_id=textlocal_group_id,
            batch_id=batch_id,
            cost_credits=cost_credits,
            message_parts=message_parts,
            send_at=send_at or snapshot.send_at or run.header.scheduled_at,
            error=error,
            metadata=run.header.metadata,
            sends=sends,
        )


class RetryAt(TransientError):
    """Not now: look at the campaign again at `when` (not an error, a wait)."""

    def __init__(self, when: datetime, reason: str) -> None:
        super().__init__(reason)
        self.when = when
