"""The steps of a campaign of several texts: its send plan, one sub-send at a time (DESIGN §4a).

A campaign whose recipients all read one text takes the plain path in `steps.py` (one segment,
one group send). Any other (language variants, several promo codes, personal fields) is planned
at READY (`send_plan.plan_sends`; the plan and the bodies it renders are recorded, so a template
edited later does not change a campaign under way) and then:

    SEGMENT_CREATED ─resolve; each group text's contacts into its own segment, created when its
                     first chunk is cut; personal texts cut into chunks, kept─► CONTACTS_LOADED
    CONTACTS_LOADED ─credit check on the total─► SEND_PENDING ─every sub-send, each once─► SENT

A campaign of personal texts only that is due now streams instead, when its credits cover the
most it could cost (every requested recipient at the most parts its texts can take):

    SEGMENT_CREATED ─credit check on that bound─► SEND_PENDING ─resolve, cut, and send each chunk
                     as it is cut (nothing kept); then the counts─► SENT

Each sub-send is exactly-once on its own, recorded in `keys.sub_sends` by fenced transitions:
- a group text (`g<i>`): `pending` with its attempt time before `send`; after a lost reply or a
  crash it is looked for (scheduled sends, the group's history) and adopted, and sent again only
  when TextLocal shows nothing after the reconcile grace — as for a one-text campaign;
- a chunk of personal texts (`p<n>`, `bulk_chunk_size` messages): `pending` before `bulk_json`;
  after a lost reply TextLocal's API history around the attempt is searched for the chunk's first
  (number, text) and the chunk adopted if found (its batch id then unknown: its messages are not
  in the delivery polls), sent again only when absent after the grace.
Resolution is deterministic (batches in order, the index version recorded), so the chunks of a
resumed load (or stream) are the same and only those not recorded are loaded (or sent). The
chunks of personal texts are encoded once, at loading, and kept in Redis until the campaign is
sent (docs/DECISIONS.md: about 88 MB per million recipients): the send step posts them without
resolving or rendering again, and only those not recorded `sent`. A stream keeps none: a resumed
one cuts them again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any, NamedTuple

from consumer.chunk_loading import HandOver, load_while_resolving
from consumer.clock import Clock, to_millis
from consumer.contact_index import (
    ContactIndex,
    MatchedVisitor,
    Resolution,
    ResolvedContact,
    VisitedContact,
)
from consumer.errors import TextLocalApiError, TextLocalOutcomeUnknown, TransientError
from consumer.events import RecipientCounts, StatusCode, StatusError, SubSendSummary
from consumer.fault_points import FaultPoints
from consumer.leased_work import LeaseLost
from consumer.logs import log_event
from consumer.metrics import Metrics
from consumer.outbox import status_entry
from consumer.send_plan import (
    DEFAULT_VARIANT,
    Routed,
    SendPlan,
    TemplateFamily,
    VariantChoice,
    choose_variant,
    personal_parts_bound,
    plan_sends,
    route_in,
    template_families,
)
from consumer.store import CampaignStore
from consumer.templates import TemplateCopy
from consumer.textlocal import TextLocalClient
from consumer.textlocal_types import Template
from consumer.workflow import (
    PROMO_CODE_PLACEHOLDER,
    CampaignState,
    message_cost,
    poll_slot,
    segment_group_name,
)

if TYPE_CHECKING:
    from consumer.steps import CampaignRun, CampaignSteps, StepSettings

log = logging.getLogger("consumer.executor")

GROUP_EXISTS = 14
PLAN_FIELD = "plan"
PERSONAL_FIELD = "personal"
STREAM_FIELD = "stream"  # {"bound": credits checked} sending chunks as cut; {"declined": true}
PENDING, SENT, PLANNED = "pending", "sent", "planned"
# Group sends or bulk_json chunks of one campaign under way at a time. The client bounds the
# TextLocal calls themselves (textlocal.max_concurrency, 4); twice as many sub-sends keep its
# slots busy while the others record themselves pending or sent (a million personal texts,
# 199 chunks: 7.6–8.7 s to SENT with 8 in four runs, 10.4–11.2 s with 4 in three;
# bench_variants.py --scenario codes).
SUB_SENDS_IN_FLIGHT = 8


class SegmentNameTaken(Exception):
    """A group of a sub-send's name exists that this campaign never asked for."""


@dataclass
class _LoadTally:
    per_text: Counter[int] = field(default_factory=Counter)
    personal: Counter[str] = field(default_factory=Counter)  # by variant
    personal_parts: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    fallbacks: int = 0


class MultiSend:
    """The steps of a campaign planned with several texts (see the module docstring)."""

    def __init__(
        self,
        steps: CampaignSteps,
        store: CampaignStore,
        index: ContactIndex,
        client: TextLocalClient,
        templates: TemplateCopy,
        settings: StepSettings,
        clock: Clock,
        metrics: Metrics,
        faults: FaultPoints,
    ) -> None:
        self._steps = steps
        self._store = store
        self._keys = store.keys
        self._index = index
        self._client = client
        self._templates = templates
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._faults = faults

    # --- the plan (READY) -----------------------------------------------------------------

    async def plan(self, run: CampaignRun) -> bool:
        """Plan the campaign's texts. True: one text for all, the plain path goes on."""
        from consumer.steps import MULTI

        header = run.header
        template = await self._templates.lookup(header.template_id)
        if template is None:
            await self._reject(
                run,
                StatusError(
                    "UNKNOWN_TEMPLATE",
                    f"template_id {header.template_id} is not among TextLocal's templates",
                ),
            )
            return False
        families = template_families(await self._templates.stored_all())
        family = families.get(template.id) or TemplateFamily(template, {})
        codes, overflow = await self._store.distinct_codes(run.key)
        plan = plan_sends(
            family, header.promo_codes, codes, overflow, self._settings.max_group_texts
        )
        if isinstance(plan, StatusError):
            await self._reject(run, plan)
            return False
        single = plan.is_single_text and plan.texts[0].promo_code in (None, plan.campaign_code)
        if single:
            await self._steps.record(
                run,
                self._steps.fenced(run, CampaignState.READY).set(
                    plan_mode="single", planned_message=plan.texts[0].text
                ),
            )
            return True
        recorded = {**plan.to_json(), "bodies": family.bodies()}
        await self._steps.record(
            run,
            self._steps.fenced(run, CampaignState.READY)
            .set_state(CampaignState.SEGMENT_CREATED)
            .set(plan_mode=MULTI)
            .set_in(self._keys.sub_sends(run.key), PLAN_FIELD, json.dumps(recorded)),
            CampaignState.SEGMENT_CREATED,
        )
        log_event(
            log,
            "campaign.planned",
            campaign=run.key,
            group_texts=len(plan.texts),
            personal_variants=len(plan.personal_variants),
            languages=len(family.variants),
        )
        return False

    # --- loading (SEGMENT_CREATED) --------------------------------------------------------

    async def load(self, run: CampaignRun) -> None:
        """Resolve once: each group text's contacts into its segment; personal ones counted.

        A campaign of personal texts only, due now, whose credits cover the most it could cost,
        goes to SEND_PENDING instead: its send step cuts the chunks and sends each as it is cut
        (`_stream_personal`)."""
        records = await self._store.sub_sends(run.key)
        plan, family = _plan_of(records)
        group = self._steps.contact_group(run)
        version = await self._steps.index_version(run)
        if not plan.texts and await self._start_streaming(run, plan, family, records):
            return
        loaded = await self._store.loaded_chunk_names(run.key)
        tally = _LoadTally()
        next_chunk: Counter[int] = Counter()
        locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        router = _Router(plan, family, group.default_language)
        # Only recipients without a group text are visited: personal ones, and those skipped.
        cutter = _PersonalCutter(router, tally, self._settings.bulk_chunk_size)
        record_numbers = self._steps.numbers_recorder(run)
        calls = asyncio.Semaphore(self._settings.contact_load_concurrency)  # see LOADERS_PER_CALL

        async def after_batch(taken: list[tuple[str, str]]) -> None:
            if record_numbers is not None:
                await record_numbers(taken)
            for number, messages_json in cutter.take_cut():
                await self._keep_chunk(run, number, messages_json)

        async def load_chunk(chunk: tuple[int, int, str, int]) -> None:
            text_index, number, payload, count = chunk
            async with locks[text_index]:
                group_id = await self._ensure_group(run, records, text_index)
            run.check_lease()
            async with calls:
                await self._client.create_contacts_bulk_json(group_id, payload, count)
            await self._store.mark_chunk_loaded(run.key, f"{text_index}:{number}")
            self._metrics.contacts_loaded.inc(count)
            self._faults.reached("contacts.chunk_loaded")

        async def resolve(hand_over: HandOver[tuple[int, int, str, int]]) -> Resolution:
            async def write_chunk(text_index: int, payload: str, count: int) -> None:
                tally.per_text[text_index] += count
                number = next_chunk[text_index]
                next_chunk[text_index] += 1
                if f"{text_index}:{number}" not in loaded:
                    await hand_over((text_index, number, payload, count))

            found = await self._resolve(
                run,
                version,
                cutter,
                after_batch,
                text_of=router.text_of if plan.texts else None,
                write_chunk=write_chunk,
            )
            for number, messages_json in cutter.take_cut(last=True):
                await self._keep_chunk(run, number, messages_json)
            return found

        from consumer.steps import LOADERS_PER_CALL

        try:
            found = await load_while_resolving(
                resolve, load_chunk, LOADERS_PER_CALL * self._settings.contact_load_concurrency
            )
        except SegmentNameTaken as taken:
            await self._fail(
                run, records, StatusError("SEGMENT_NAME_TAKEN", str(taken)), StatusCode.FAILED
            )
            return
        await self._finish_loading(run, records, plan, family, found, tally, cutter.chunks)

    async def _finish_loading(
        self,
        run: CampaignRun,
        records: dict[str, dict[str, Any]],
        plan: SendPlan,
        family: TemplateFamily,
        found: Resolution,
        tally: _LoadTally,
        personal_chunks: _PersonalChunks,
        *,
        streamed: bool = False,
    ) -> bool:
        """Record what loading found (the SEGMENT_CREATED status with the counts): the campaign
        moves to CONTACTS_LOADED, or, `streamed` (its chunks sent as they were cut), stays
        SEND_PENDING with its exact cost. False when it ended instead: nobody to send to."""
        if family.variants:  # everyone given a default-variant group text fell back to it
            tally.fallbacks += sum(
                count
                for text_index, count in tally.per_text.items()
                if plan.texts[text_index].variant == DEFAULT_VARIANT
            )
        skipped = sum(tally.skipped.values())
        sendable = sum(tally.per_text.values()) + sum(tally.personal.values())
        counts = RecipientCounts(
            requested=run.snapshot.requested,
            matched=sendable,
            unmatched=found.unmatched,
            invalid_numbers=found.invalid_numbers,
            duplicates=found.duplicates,
            skipped=skipped,
        )
        if sendable == 0:
            if skipped:
                problem = StatusError(
                    "NO_PROMO_CODE",
                    f"{skipped} matched customers, none with a promo code for the text: "
                    "the campaign would send nothing",
                )
                await self._fail(run, records, problem, StatusCode.REJECTED, counts)
            else:
                await self._fail(
                    run, records, self._steps.nobody(run, counts), StatusCode.FAILED, counts
                )
            return False
        state = CampaignState.SEND_PENDING if streamed else CampaignState.SEGMENT_CREATED
        transition = self._steps.fenced(run, state)
        for text_index, count in tally.per_text.items():
            entry = {**records.get(_group_name(text_index), {}), "count": count}
            entry.setdefault("state", PLANNED)
            records[_group_name(text_index)] = entry
            transition.set_in(
                self._keys.sub_sends(run.key), _group_name(text_index), json.dumps(entry)
            )
        if tally.personal:
            personal: dict[str, object] = {
                "count": sum(tally.personal.values()),
                "parts": tally.personal_parts,
                "by_variant": dict(tally.personal),
                "chunks": personal_chunks.cut_so_far,  # [messages, unicode] of each, in order
            }
            records[PERSONAL_FIELD] = personal
            transition.set_in(self._keys.sub_sends(run.key), PERSONAL_FIELD, json.dumps(personal))
        event = self._steps.status_event(
            run,
            StatusCode.SEGMENT_CREATED,
            counts=counts,
            sends=_summaries(plan, records),
        )
        transition.set_counts(counts).set(language_fallbacks=tally.fallbacks).emit(
            self._keys.outbox, status_entry(self._steps.registry, event)
        )
        if streamed:
            transition.set(estimated_cost=tally.personal_parts)
            await self._steps.record(run, transition)
        else:
            await self._steps.record(
                run,
                transition.set_state(CampaignState.CONTACTS_LOADED),
                CampaignState.CONTACTS_LOADED,
            )
        self._metrics.unmatched_customers.labels("unmatched").inc(counts.unmatched)
        self._metrics.unmatched_customers.labels("invalid_number").inc(counts.invalid_numbers)
        for reason, count in tally.skipped.items():
            self._metrics.unmatched_customers.labels(reason).inc(count)
        self._metrics.unmatched_customers.labels("default_language").inc(tally.fallbacks)
        log_event(
            log,
            "campaign.contacts_loaded",
            campaign=run.key,
            group_texts=len(tally.per_text),
            personal=sum(tally.personal.values()),
            language_fallbacks=tally.fallbacks,
            streamed=streamed,
            **{f"skipped_{reason}": count for reason, count in tally.skipped.items()},
            **vars(counts),
        )
        return True

    # --- personal texts sent as they are cut (SEGMENT_CREATED → SEND_PENDING) ------------------

    async def _start_streaming(
        self,
        run: CampaignRun,
        plan: SendPlan,
        family: TemplateFamily,
        records: dict[str, dict[str, Any]],
    ) -> bool:
        """Go to SEND_PENDING before resolving, when a campaign of personal texts only may send
        each chunk as it is cut: due now (a chunk scheduled at TextLocal could still be
        cancelled one by one, but a cancel would then race the chunks being cut), and its
        credits cover the most it could cost (every requested recipient at the most parts a
        personal text of the plan can take, `personal_parts_bound`). Otherwise the campaign
        loads first and checks the exact total, as any other. True when it went."""
        if STREAM_FIELD in records or self._send_time(run)[1]:
            return False  # declined before (its balance call is not made again), or scheduled
        bound = run.snapshot.requested * personal_parts_bound(plan, family)
        if not run.header.test_mode:
            balance = await self._client.balance()
            if balance.sms < bound:
                log_event(
                    log,
                    "campaign.stream_declined",
                    campaign=run.key,
                    bound=bound,
                    balance=balance.sms,
                )
                await self._set_record(
                    run, records, STREAM_FIELD, {"declined": True}, CampaignState.SEGMENT_CREATED
                )
                return False
        await self._steps.record(
            run,
            self._steps.fenced(run, CampaignState.SEGMENT_CREATED)
            .set_state(CampaignState.SEND_PENDING)
            .set(send_at=self._clock.now(), scheduled=False, estimated_cost=bound)
            .set_in(self._keys.sub_sends(run.key), STREAM_FIELD, json.dumps({"bound": bound})),
            CampaignState.SEND_PENDING,
        )
        log_event(log, "campaign.streaming", campaign=run.key, credits_bound=bound)
        return True

    async def _stream_personal(
        self,
        run: CampaignRun,
        records: dict[str, dict[str, Any]],
        plan: SendPlan,
        family: TemplateFamily,
    ) -> bool:
        """Resolve and cut the personal texts, sending each chunk (`_send_chunk`, exactly once
        on its own) as soon as the numbers of the batches it holds are recorded. Then record
        what was found, as loading does. False when the campaign ended instead.

        Resolution is deterministic for the recorded index version, so a resumed stream cuts
        the same chunks and sends only those not recorded `sent` (a `pending` one is looked for
        in TextLocal's history first). Should that version be gone (rebuilt over an hour ago),
        the chunks would differ from those already sent: the campaign fails, never guessing.
        The chunks go through the load steps' pipeline (`chunk_loading.load_while_resolving`,
        `SUB_SENDS_IN_FLIGHT` senders): a chunk that fails starts no new one, those under way
        finish and are recorded, and its error is raised at the next chunk cut, which stops
        resolution (the step is retried as a whole); a failed resolution, too, lets the sends
        under way finish (a cancelled `bulk_json` would be an outcome unknown)."""
        group = self._steps.contact_group(run)
        version = run.snapshot.index_version
        if not version or not await self._index.has_version(group.group_id, version):
            sent = sum(1 for name, e in records.items() if _is_chunk(name) and e.get("state"))
            await self._fail(
                run,
                records,
                StatusError(
                    "CONTACT_INDEX_GONE",
                    f"the contact index version the campaign's texts were being cut from is gone "
                    f"({sent} chunks had been sent or tried); the rest cannot be cut the same",
                ),
                StatusCode.FAILED,
            )
            return False
        resumed = any(_is_chunk(name) for name in records)
        tally = _LoadTally()
        cutter = _PersonalCutter(
            _Router(plan, family, group.default_language), tally, self._settings.bulk_chunk_size
        )
        personal_chunks = cutter.chunks
        record_numbers = self._steps.numbers_recorder(run, keep_existing=resumed)

        async def send_cut(chunk: tuple[int, str]) -> None:
            number, messages_json = chunk
            count, unicode = personal_chunks.cut_so_far[number]
            await self._send_chunk(run, records, number, messages_json, count, unicode)

        async def resolve(hand_over: HandOver[tuple[int, str]]) -> Resolution:
            async def after_batch(taken: list[tuple[str, str]], *, last: bool = False) -> None:
                # Numbers first: a receipt for a chunk finds its customers.
                if record_numbers is not None:
                    await record_numbers(taken)
                for chunk in cutter.take_cut(last=last):
                    await hand_over(chunk)

            found = await self._resolve(run, version, cutter, after_batch)
            await after_batch([], last=True)
            return found

        found = await load_while_resolving(resolve, send_cut, SUB_SENDS_IN_FLIGHT)
        return await self._finish_loading(
            run, records, plan, family, found, tally, personal_chunks, streamed=True
        )

    async def _resolve(
        self,
        run: CampaignRun,
        version: str,
        cutter: _PersonalCutter,
        after_batch: MatchedVisitor,
        *,
        text_of: Callable[[str, str | None], int | None] | None = None,
        write_chunk: Callable[[int, str, int], Awaitable[None]] | None = None,
    ) -> Resolution:
        """The campaign's recipients resolved in order: those of a group text (`text_of`) into
        `write_chunk`, the others visited by `cutter`; `after_batch` after each batch."""
        return await self._index.resolve_each(
            self._keys.recipients(run.key),
            self._keys.recipient_codes(run.key),
            run.header.batch_count,
            self._steps.contact_group(run),
            version,
            cutter.visit,
            run.check_lease,
            text_of=text_of,
            write_chunk=write_chunk,
            on_matched=after_batch,
        )

    async def _keep_chunk(self, run: CampaignRun, number: int, messages_json: str) -> None:
        """Keep a cut chunk of personal texts, fenced like every write of a step: a replica
        that lost the campaign cannot overwrite the chunks of the one that has it."""
        transition = self._steps.fenced(run, CampaignState.SEGMENT_CREATED).set_in(
            self._keys.personal_chunks(run.key), str(number), messages_json
        )
        result = await self._store.apply(transition, self._clock.now())
        if not result.ok:
            raise LeaseLost(f"{run.key}: {result.reason}")

    async def _ensure_group(
        self, run: CampaignRun, records: dict[str, dict[str, Any]], text_index: int
    ) -> int:
        """The sub-send's segment: created on first need, its name recorded before asking."""
        name_field = _group_name(text_index)
        entry = records.get(name_field, {})
        if entry.get("group_id"):
            return int(entry["group_id"])
        name = segment_group_name(
            self._steps.contact_group(run), run.header.ref, f"{run.header.event_id}#{text_index}"
        )
        attempted_before = entry.get("group_name") == name
        if not attempted_before:
            entry = {**entry, "group_name": name, "state": PLANNED}
            await self._set_record(run, records, name_field, entry, CampaignState.SEGMENT_CREATED)
        try:
            group_id = (await self._client.create_group(name)).id
        except TextLocalApiError as exc:
            if exc.code != GROUP_EXISTS:
                raise
            if not attempted_before:
                raise SegmentNameTaken(
                    f"TextLocal already has a group named {name!r} that this campaign did not "
                    "create; it is not used"
                ) from None
            group_id = await self._steps.existing_group(name)
        except TextLocalOutcomeUnknown:
            raise TransientError(f"create_group for {run.key}: outcome unknown") from None
        self._faults.reached("segment.created")
        await self._set_record(
            run,
            records,
            name_field,
            {**entry, "group_id": group_id},
            CampaignState.SEGMENT_CREATED,
        )
        return group_id

    # --- sending (CONTACTS_LOADED, SEND_PENDING) ------------------------------------------

    async def send(self, run: CampaignRun) -> None:
        """Credit check, then every sub-send exactly once, then SENT."""
        records = await self._store.sub_sends(run.key)
        plan, family = _plan_of(records)
        if _streaming(records):
            if not await self._stream_personal(run, records, plan, family):
                return
        elif run.snapshot.state == CampaignState.CONTACTS_LOADED and not await self._start_sending(
            run, plan, records
        ):
            return
        group_sends = [
            functools.partial(self._send_group, run, records, text_index, planned.text)
            for text_index, planned in enumerate(plan.texts)
            if records.get(_group_name(text_index), {}).get("count")
        ]
        await _each_once(group_sends)
        if records.get(PERSONAL_FIELD, {}).get("count"):
            await self._send_personal(run, records)
        await self._record_sent(run, plan, records)

    async def _start_sending(
        self, run: CampaignRun, plan: SendPlan, records: dict[str, dict[str, Any]]
    ) -> bool:
        needed = records.get(PERSONAL_FIELD, {}).get("parts", 0)
        for text_index, planned in enumerate(plan.texts):
            count = records.get(_group_name(text_index), {}).get("count", 0)
            needed += count * message_cost(planned.text).parts
        if not run.header.test_mode:
            balance = await self._client.balance()
            if balance.sms < needed:
                await self._fail(
                    run,
                    records,
                    StatusError(
                        "INSUFFICIENT_CREDITS",
                        f"the campaign's texts need {needed} credits; the balance is "
                        f"{balance.sms:g}",
                    ),
                    StatusCode.FAILED,
                )
                return False
        now = self._clock.now()
        scheduled = run.header.scheduled_at > now + self._settings.schedule_margin
        await self._steps.record(
            run,
            self._steps.fenced(run, CampaignState.CONTACTS_LOADED)
            .set_state(CampaignState.SEND_PENDING)
            .set(
                send_at=run.header.scheduled_at if scheduled else now,
                scheduled=scheduled,
                estimated_cost=needed,
            ),
            CampaignState.SEND_PENDING,
        )
        return True

    async def _send_group(
        self, run: CampaignRun, records: dict[str, dict[str, Any]], text_index: int, text: str
    ) -> None:
        name_field = _group_name(text_index)
        entry = records[name_field]
        if entry.get("state") == SENT:
            return
        group_id = int(entry["group_id"])
        if entry.get("state") == PENDING:
            found = await self._steps.find_group_send(group_id, _time(entry.get("attempted_at")))
            if found is not None:
                log_event(log, "campaign.send_adopted", campaign=run.key, batch_id=found.batch_id)
                await self._set_record(
                    run,
                    records,
                    name_field,
                    {**entry, "state": SENT, "batch_ids": [found.batch_id], "cost": found.cost},
                    CampaignState.SEND_PENDING,
                )
                return
            self._wait_out_grace(entry)
        send_at, scheduled = self._send_time(run)
        entry = {**entry, "state": PENDING, "attempted_at": to_millis(self._clock.now())}
        await self._set_record(run, records, name_field, entry, CampaignState.SEND_PENDING)
        cost = message_cost(text)
        custom = await self._steps.send_reference(run, send_at)
        run.check_lease()
        try:
            result = await self._client.send(
                message=text,
                group_id=group_id,
                sender=run.header.sender or self._steps.contact_group(run).sender,
                schedule_time=send_at if scheduled else None,
                validity=_validity(run, send_at),
                custom=custom,
                receipt_url=self._steps.receipt_url,
                optouts=True,
                test=run.header.test_mode,
                unicode=cost.unicode,
            )
        except TextLocalOutcomeUnknown:
            log_event(log, "campaign.send_outcome_unknown", logging.WARNING, campaign=run.key)
            raise self._retry_after_grace(entry) from None
        except TextLocalApiError as exc:
            await self._set_record(
                run,
                records,
                name_field,
                {**entry, "state": SENT, "error": f"TEXTLOCAL_{exc.code}", "batch_ids": []},
                CampaignState.SEND_PENDING,
            )
            return
        self._faults.reached("send.returned")
        self._metrics.sms_accepted.inc(result.num_messages)
        self._metrics.credits_spent.inc(result.cost)
        await self._set_record(
            run,
            records,
            name_field,
            {**entry, "state": SENT, "batch_ids": [result.batch_id], "cost": result.cost},
            CampaignState.SEND_PENDING,
        )

    async def _send_personal(self, run: CampaignRun, records: dict[str, dict[str, Any]]) -> None:
        """Send each chunk of personal texts once, as the load step cut and kept it (those not
        recorded `sent`), `_each_once`."""
        chunks = records[PERSONAL_FIELD]["chunks"]

        async def send_kept(number: int) -> None:
            count, unicode = chunks[number]
            messages_json = await self._store.personal_chunk(run.key, number)
            await self._send_chunk(run, records, number, messages_json, count, unicode)

        await _each_once(
            functools.partial(send_kept, number)
            for number in range(len(chunks))
            if records.get(_chunk_name(number), {}).get("state") != SENT
        )

    async def _send_chunk(
        self,
        run: CampaignRun,
        records: dict[str, dict[str, Any]],
        number: int,
        messages_json: str,
        count: int,
        unicode: bool,
    ) -> None:
        name_field = _chunk_name(number)
        entry = records.get(name_field, {"state": PLANNED})
        if entry.get("state") == SENT:
            return
        if entry.get("state") == PENDING:
            first = _first_message(messages_json)
            if await self._chunk_in_history(first, _time(entry.get("attempted_at"))):
                log_event(log, "campaign.chunk_adopted", campaign=run.key, chunk=number)
                await self._set_record(
                    run,
                    records,
                    name_field,
                    {**entry, "state": SENT, "count": count, "batch_ids": []},
                    CampaignState.SEND_PENDING,
                )
                return
            self._wait_out_grace(entry)
        send_at, scheduled = self._send_time(run)
        entry = {"state": PENDING, "attempted_at": to_millis(self._clock.now())}
        await self._set_record(run, records, name_field, entry, CampaignState.SEND_PENDING)
        custom = await self._steps.send_reference(run, send_at)
        run.check_lease()
        try:
            result = await self._client.bulk_json_encoded(
                messages_json,
                count,
                sender=run.header.sender or self._steps.contact_group(run).sender,
                test=run.header.test_mode,
                schedule_time=send_at if scheduled else None,
                custom=custom,
                receipt_url=self._steps.receipt_url,
                unicode=unicode,
            )
        except TextLocalOutcomeUnknown:
            log_event(log, "campaign.chunk_outcome_unknown", logging.WARNING, campaign=run.key)
            raise self._retry_after_grace(entry) from None
        self._faults.reached("personal.chunk_sent")
        self._metrics.sms_accepted.inc(result.num_messages)
        if result.cost is not None:
            self._metrics.credits_spent.inc(result.cost)
        await self._set_record(
            run,
            records,
            name_field,
            {
                **entry,
                "state": SENT,
                "count": count,
                "batch_ids": list(result.batch_ids),
                "cost": result.cost,
            },
            CampaignState.SEND_PENDING,
        )

    async def _chunk_in_history(
        self, first: tuple[str, str], attempted_at: datetime | None
    ) -> bool:
        now = self._clock.now()
        attempted_at = attempted_at or now
        async for page in self._client.iter_history_api(
            min_time=attempted_at - timedelta(minutes=10), max_time=now + timedelta(minutes=10)
        ):
            if first in page:
                return True
        return False

    async def _record_sent(
        self, run: CampaignRun, plan: SendPlan, records: dict[str, dict[str, Any]]
    ) -> None:
        batch_ids: list[int] = []
        cost = 0.0
        messages = 0
        for name, entry in sorted(records.items()):
            if name in (PLAN_FIELD, PERSONAL_FIELD):
                continue
            batch_ids += [int(b) for b in entry.get("batch_ids", [])]
            cost += float(entry.get("cost") or 0)
        for name, entry in records.items():
            if name.startswith("g"):
                messages += int(entry.get("count", 0))
        messages += int(records.get(PERSONAL_FIELD, {}).get("count", 0))
        send_at = run.snapshot.send_at or self._clock.now()
        now = self._clock.now()
        window = timedelta(
            days=run.header.metrics_window_days or self._settings.default_window_days
        )
        status = self._steps.status_event(
            run,
            StatusCode.SCHEDULED if send_at > now else StatusCode.SENT,
            batch_id=batch_ids[0] if batch_ids else None,
            cost_credits=cost,
            send_at=send_at,
            sends=_summaries(plan, records),
        )
        group_ids = sorted(
            int(entry["group_id"]) for entry in records.values() if entry.get("group_id")
        )
        transition = (
            self._steps.fenced(run, CampaignState.SEND_PENDING)
            .set(
                batch_id=batch_ids[0] if batch_ids else None,
                batch_ids=batch_ids,
                group_ids=group_ids,
                cost=cost,
                num_messages=messages,
                sent_at=send_at,
                window_ends_at=send_at + window,
                polls_done=0,
            )
            .dequeue(self._keys.work_queue, run.key)
            .emit(self._keys.outbox, status_entry(self._steps.registry, status))
        )
        if run.header.test_mode or not batch_ids:
            transition.set_state(CampaignState.DONE).set(ended_at=now)
            transition.expire(self._keys.campaign(run.key), _retention_s())
            new_state = CampaignState.DONE
        else:
            first_poll = poll_slot(send_at, self._settings.poll_interval, window, 1)
            transition.set_state(CampaignState.SENT)
            transition.enqueue(self._keys.poll_queue, run.key, first_poll.due_at)
            new_state = CampaignState.SENT
        await self._steps.record(run, transition, new_state)
        self._faults.reached("send.recorded")
        log_event(
            log,
            "campaign.sent",
            campaign=run.key,
            sub_sends=len(batch_ids),
            recipients=messages,
            cost=cost,
        )
        await self._steps.discard_working_data(run.key)
        if new_state == CampaignState.DONE:
            for group_id in group_ids:
                await self._steps.delete_segment(group_id)

    # --- cancellation ---------------------------------------------------------------------

    async def cancel(self, run: CampaignRun) -> None:
        """Before the sends: delete every segment. After: cancel what is still scheduled."""
        records = await self._store.sub_sends(run.key)
        state = run.snapshot.state
        if state.before_send:
            await self._fail(
                run,
                records,
                StatusError("CANCELLED_BY_OPTIMOVE", run.snapshot.cancel_reason or "-"),
                StatusCode.CANCELLED,
            )
            return
        if state == CampaignState.SEND_PENDING and _streaming(records):
            # Chunks cut so far have gone, and the rest cannot be told apart from them until
            # cut: the stream is finished, then the cancel is refused as after any send.
            await self.send(run)
            return
        if state == CampaignState.SEND_PENDING:
            # Finish recording (never starting a new sub-send) before deciding.
            for entry in records.values():
                if entry.get("state") == PENDING:
                    raise _RetrySoon("cancelling: a sub-send may still be in flight", self._clock)
        batch_ids = run.snapshot.batch_ids or [
            b for entry in records.values() for b in entry.get("batch_ids", [])
        ]
        send_at = run.snapshot.send_at or run.snapshot.sent_at
        gone = 0
        for batch_id in batch_ids:
            if send_at is None or not await self._steps.cancel_scheduled_send(
                int(batch_id), send_at
            ):
                gone += 1
        if gone == 0:
            await self._fail(
                run,
                records,
                StatusError("CANCELLED_BY_OPTIMOVE", run.snapshot.cancel_reason or "-"),
                StatusCode.CANCELLED,
            )
            return
        log_event(
            log, "campaign.cancel_partly_refused", logging.WARNING, campaign=run.key, gone=gone
        )
        await self._steps.refuse_cancel(
            run,
            f"{gone} of the campaign's {len(batch_ids)} sends had already gone; "
            f"the other {len(batch_ids) - gone} are cancelled",
        )

    # --- helpers --------------------------------------------------------------------------

    async def _fail(
        self,
        run: CampaignRun,
        records: dict[str, dict[str, Any]],
        error: StatusError,
        status: StatusCode,
        counts: RecipientCounts | None = None,
    ) -> None:
        await self._steps.fail(run, error, status=status, counts=counts, delete_segment=False)
        for entry in records.values():
            if entry.get("group_id"):
                try:
                    await self._steps.delete_segment(int(entry["group_id"]))
                except TransientError as exc:
                    log_event(
                        log,
                        "campaign.segment_not_deleted",
                        logging.WARNING,
                        campaign=run.key,
                        group_id=entry["group_id"],
                        error=str(exc),
                    )

    async def _reject(self, run: CampaignRun, problem: StatusError) -> None:
        await self._steps.fail(run, problem, status=StatusCode.REJECTED, delete_segment=False)

    async def _set_record(
        self,
        run: CampaignRun,
        records: dict[str, dict[str, Any]],
        name: str,
        entry: dict[str, Any],
        state: CampaignState,
    ) -> None:
        await self._steps.record(
            run,
            self._steps.fenced(run, state).set_in(
                self._keys.sub_sends(run.key), name, json.dumps(entry)
            ),
        )
        records[name] = entry

    def _send_time(self, run: CampaignRun) -> tuple[datetime, bool]:
        now = self._clock.now()
        scheduled = run.header.scheduled_at > now + self._settings.schedule_margin
        return (run.header.scheduled_at if scheduled else now), scheduled

    def _wait_out_grace(self, entry: dict[str, Any]) -> None:
        attempted_at = _time(entry.get("attempted_at")) or self._clock.now()
        settles_at = attempted_at + self._settings.send_reconcile_grace
        if self._clock.now() < settles_at:
            from consumer.steps import RetryAt

            raise RetryAt(settles_at, "a sub-send attempt may still be in flight")

    def _retry_after_grace(self, entry: dict[str, Any]) -> Exception:
        from consumer.steps import RetryAt

        attempted_at = _time(entry.get("attempted_at")) or self._clock.now()
        return RetryAt(attempted_at + self._settings.send_reconcile_grace, "reply lost")


_UNSEEN = object()


class _Router:
    """`send_plan.route` for each resolved recipient, without redoing what cannot differ.

    A recipient's variant depends only on their language, and the route of a recipient of a
    group-text variant only on their language and (if the body takes one) own code: both are
    remembered (a bounded number of them). Names are decoded only for a variant whose body uses
    them. A personal text that takes a code and no names, with a plain code (ASCII letters and
    digits: GSM-7, none from its extension table), costs what any plain code of that length
    would: it is costed once per (variant, code length), and only rendered per recipient.
    """

    _BOUND = 10_000

    def __init__(self, plan: SendPlan, family: TemplateFamily, default_language: str) -> None:
        self._plan = plan
        self._family = family
        self._default_language = default_language
        self._variants: dict[str, VariantChoice] = {}
        self._routes: dict[tuple[str, str | None], Routed] = {}
        self._by_code_length: dict[tuple[str, int], Routed] = {}
        self._texts: dict[tuple[str, str | None], int | None] = {}
        self._coded: dict[str, _CodedBody | None] = {}

    def __call__(self, contact: ResolvedContact) -> Routed:
        language = contact.language or self._default_language
        choice = self._variants.get(language) or self._variant(language)
        if choice.personal:
            if choice.uses_names:
                first, last = contact.names()
                return route_in(self._plan, choice, contact.promo_code, first, last)
            return self._code_route(choice, contact.promo_code)
        return self._group_route(language, choice, contact.promo_code)

    @property
    def campaign_code(self) -> str | None:
        return self._plan.campaign_code

    def text_of(self, language: str, promo_code: str | None) -> int | None:
        """The recipient's group text (its index), or None: personal, or skipped.

        Asked once per recipient, so the answer for a (language, code) of a group text is
        remembered as such: one dict lookup for the recipients of a group text."""
        known = self._texts.get((language, promo_code), _UNSEEN)
        if known is not _UNSEEN:
            return known  # type: ignore[return-value]
        variant_language = language or self._default_language
        choice = self._variant(variant_language)
        if choice.personal:
            return None  # not remembered: its codes may be as many as its recipients
        text = self._group_route(variant_language, choice, promo_code).text_index
        if len(self._texts) < self._BOUND:
            self._texts[(language, promo_code)] = text
        return text

    def _variant(self, language: str) -> VariantChoice:
        choice = self._variants.get(language)
        if choice is None:
            choice = choose_variant(self._plan, self._family, language)
            if len(self._variants) < self._BOUND:
                self._variants[language] = choice
        return choice

    def _code_route(self, choice: VariantChoice, promo_code: str | None) -> Routed:
        """`route_in` for a personal text without names (see the class docstring)."""
        code = promo_code or self._plan.campaign_code
        if code is None or not _is_plain(code):
            return route_in(self._plan, choice, promo_code)
        like = self.costed_like(choice, code)
        if like.skipped:  # too long: so is every code of that length
            return like
        text = choice.body.replace(PROMO_CODE_PLACEHOLDER, code)  # `render`, without names
        return Routed(
            None, text, like.variant, like.fell_back_to_default, None, like.parts, like.unicode
        )

    def costed_like(self, choice: VariantChoice, plain_code: str) -> Routed:
        """The route of any plain code of `plain_code`'s length in `choice`'s personal body
        (its text is not the recipient's: only its cost, variant and skip reason are)."""
        key = (choice.variant, len(plain_code))
        like = self._by_code_length.get(key)
        if like is None:
            like = route_in(self._plan, choice, plain_code)
            if len(self._by_code_length) < self._BOUND:
                self._by_code_length[key] = like
        return like

    def coded_body(self, language: str) -> _CodedBody | None:
        """For a recipient language whose variant goes out personally, takes a code and no
        names: its body cut at the code placeholder, each piece JSON-escaped (a plain code
        needs no escaping, so a text's JSON string is the pieces joined by its code)."""
        if language in self._coded:
            return self._coded[language]
        choice = self._variant(language or self._default_language)
        coded = None
        if choice.personal and choice.takes_code and not choice.uses_names:
            pieces = choice.body.split(PROMO_CODE_PLACEHOLDER)
            coded = _CodedBody(choice, [encode_basestring(piece)[1:-1] for piece in pieces])
        if len(self._coded) < self._BOUND:
            self._coded[language] = coded
        return coded

    def _group_route(self, language: str, choice: VariantChoice, promo_code: str | None) -> Routed:
        key = (language, promo_code if choice.takes_code else None)
        routed = self._routes.get(key)
        if routed is None:
            routed = route_in(self._plan, choice, key[1])
            if len(self._routes) < self._BOUND:
                self._routes[key] = routed
        return routed


class _CodedBody(NamedTuple):
    """A personal body that takes a code and no names, ready to be filled (`_Router.coded_body`)."""

    choice: VariantChoice
    json_pieces: list[str]  # the body's pieces around each code placeholder, JSON-escaped


class _PersonalCutter:
    """Routes each recipient visited by `ContactIndex.resolve_each` (one without a group text:
    personal, or skipped), counts it, and cuts the personal texts into chunks. A visit does no
    I/O (a coroutine per recipient would cost a third of the routing); the chunks cut wait in
    `take_cut` until the caller hands them on, after each batch.

    The common personal text, a body with a plain code (`_is_plain`) and no names, is written
    straight into its chunk's JSON (`_CodedBody`), costed once per code length; any other goes
    through `_Router` one recipient at a time. Both give the same bytes (tests/test_send_plan.py).
    """

    def __init__(self, router: _Router, tally: _LoadTally, chunk_size: int) -> None:
        self._router = router
        self._tally = tally
        self.chunks = _PersonalChunks(chunk_size)
        self._cut: list[tuple[int, str]] = []

    def visit(self, contacts: list[VisitedContact]) -> None:
        router, tally, chunks = self._router, self._tally, self.chunks
        campaign_code = router.campaign_code
        language: str | None = None
        coded: _CodedBody | None = None
        for contact in contacts:
            number, contact_language, _, own_code = contact
            if contact_language != language:
                language = contact_language
                coded = router.coded_body(language)
            code = own_code or campaign_code
            if coded is None or code is None or not _is_plain(code):
                self._visit_one(ResolvedContact._make(contact))
                continue
            like = router.costed_like(coded.choice, code)
            if like.skipped:
                tally.skipped[like.skipped] += 1
                continue
            tally.fallbacks += like.fell_back_to_default
            tally.personal[like.variant] += 1
            tally.personal_parts += like.parts
            text_json = code.join(coded.json_pieces)
            if chunks.add_encoded(f'{{"number":"{number}","text":"{text_json}"}}', like.unicode):
                self._cut.append(chunks.cut())

    def _visit_one(self, contact: ResolvedContact) -> None:
        routed = self._router(contact)
        tally = self._tally
        if routed.skipped:
            tally.skipped[routed.skipped] += 1
            return
        assert routed.personal_text is not None, "a group text's recipient was visited"
        tally.fallbacks += routed.fell_back_to_default
        tally.personal[routed.variant] += 1
        tally.personal_parts += routed.parts
        if self.chunks.add(contact.number, routed.personal_text, routed.unicode):
            self._cut.append(self.chunks.cut())

    def take_cut(self, *, last: bool = False) -> list[tuple[int, str]]:
        """The chunks cut since the last call, (number, messages JSON) in order; `last`: the
        one still filling too (resolution is over)."""
        if last and self.chunks.filling:
            self._cut.append(self.chunks.cut())
        taken, self._cut = self._cut, []
        return taken


class _PersonalChunks:
    """Personal texts cut into `bulk_json` chunks as the load step meets them.

    Each message is encoded once, straight into the JSON array `bulk_json` takes (the number
    is the index's normalised digits, the text a JSON string), so the send step only reads the
    kept chunks and posts them.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._messages: list[str] = []
        self._unicode = False
        self.cut_so_far: list[tuple[int, bool]] = []  # (messages, unicode) of each chunk cut

    @property
    def filling(self) -> bool:
        return bool(self._messages)

    def add(self, number: str, text: str, unicode: bool) -> bool:
        """Add a message; True when the chunk is full (then `cut` it)."""
        message = '{"number":"' + number + '","text":' + encode_basestring(text) + "}"
        return self.add_encoded(message, unicode)

    def add_encoded(self, message_json: str, unicode: bool) -> bool:
        """`add`, the message already encoded as `bulk_json` takes it."""
        self._messages.append(message_json)
        self._unicode = self._unicode or unicode
        return len(self._messages) == self._size

    def cut(self) -> tuple[int, str]:
        """(the chunk's number, its messages as a JSON array); the next chunk starts empty."""
        number = len(self.cut_so_far)
        self.cut_so_far.append((len(self._messages), self._unicode))
        messages_json = "[" + ",".join(self._messages) + "]"
        self._messages, self._unicode = [], False
        return number, messages_json


async def _each_once(sub_sends: Iterable[Callable[[], Awaitable[None]]]) -> None:
    """Run sub-sends, up to SUB_SENDS_IN_FLIGHT at a time (the client bounds its calls),
    each recording itself `pending` before its call and `sent` after, through the pipeline
    of the load steps (`chunk_loading.load_while_resolving`): one that fails does not cancel
    the others in flight; nothing new starts after a failure, those under way finish and are
    recorded, then its error is raised."""

    async def hand_each_over(hand_over: HandOver[Callable[[], Awaitable[None]]]) -> None:
        for sub_send in sub_sends:
            await hand_over(sub_send)

    async def run(sub_send: Callable[[], Awaitable[None]]) -> None:
        await sub_send()

    await load_while_resolving(hand_each_over, run, SUB_SENDS_IN_FLIGHT)


def _streaming(records: dict[str, dict[str, Any]]) -> bool:
    """Sending chunks as they are cut, and not done cutting them."""
    return "bound" in records.get(STREAM_FIELD, {}) and PERSONAL_FIELD not in records


def _is_plain(code: str) -> bool:
    """ASCII letters and digits: GSM-7 outside its extension table, nothing to escape in JSON."""
    return code.isascii() and code.isalnum()


def _chunk_name(number: int) -> str:
    return f"p{number}"


def _is_chunk(name: str) -> bool:
    return name.startswith("p") and name[1:].isdigit()


def _first_message(messages_json: str) -> tuple[str, str]:
    """A kept chunk's first (number, text), decoding only that message."""
    first, _ = json.JSONDecoder().raw_decode(messages_json, 1)
    return str(first["number"]), str(first["text"])


def _RetrySoon(reason: str, clock: Clock) -> Exception:  # noqa: N802 - reads as the exception
    from consumer.steps import RetryAt

    return RetryAt(clock.now() + timedelta(seconds=5), reason)


def _plan_of(records: dict[str, dict[str, Any]]) -> tuple[SendPlan, TemplateFamily]:
    raw = records[PLAN_FIELD]
    bodies: dict[str, str] = dict(raw["bodies"])
    default = Template(id=0, title="", body=bodies.pop(DEFAULT_VARIANT), sender_name=None)
    return SendPlan.from_json(raw), TemplateFamily(default, bodies)


def _summaries(plan: SendPlan, records: dict[str, dict[str, Any]]) -> tuple[SubSendSummary, ...]:
    summaries = []
    for text_index, planned in enumerate(plan.texts):
        entry = records.get(_group_name(text_index))
        if not entry or not entry.get("count"):
            continue
        summaries.append(
            SubSendSummary(
                kind="group",
                language=planned.variant,
                promo_code=planned.promo_code,
                recipients=int(entry["count"]),
                textlocal_group_id=entry.get("group_id"),
                batch_ids=tuple(int(b) for b in entry.get("batch_ids", [])),
                cost_credits=entry.get("cost"),
            )
        )
    personal = records.get(PERSONAL_FIELD)
    if personal and personal.get("count"):
        chunks = [e for name, e in records.items() if _is_chunk(name)]
        summaries.append(
            SubSendSummary(
                kind="personal",
                language=",".join(sorted(personal.get("by_variant", {}))),
                promo_code=None,
                recipients=int(personal["count"]),
                batch_ids=tuple(int(b) for e in chunks for b in e.get("batch_ids", [])),
                cost_credits=sum(float(e.get("cost") or 0) for e in chunks) if chunks else None,
            )
        )
    return tuple(summaries)


def _group_name(text_index: int) -> str:
    return f"g{text_index}"


def _time(millis: object) -> datetime | None:
    return None if millis in (None, "") else datetime.fromtimestamp(int(str(millis)) / 1000, UTC)


def _validity(run: CampaignRun, send_at: datetime) -> datetime | None:
    hours = run.header.validity_hours
    return send_at + timedelta(hours=hours) if hours else None


def _retention_s() -> int:
    from consumer.steps import FINISHED_CAMPAIGN_RETENTION_S

    return FINISHED_CAMPAIGN_RETENTION_S
