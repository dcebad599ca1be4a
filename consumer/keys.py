"""Every Redis key the daemon uses, in one place.

All keys share one prefix (default `tlc:`), so several deployments or test runs can share a Redis
server. A campaign key is Optimove's "tenant:campaign:channel". The daemon needs a single Redis
(primary with replicas is fine); leases are claimed inside Lua scripts that build lease keys from
queue members, which Redis Cluster would not allow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "tlc:"

    # --- one campaign ---------------------------------------------------------------------
    def campaign(self, key: str) -> str:
        """Hash: state, header, counters, TextLocal ids (see store.CampaignSnapshot)."""
        return f"{self.campaign_prefix}{key}"

    @property
    def campaign_prefix(self) -> str:
        return f"{self.prefix}campaign:"

    def batches(self, key: str) -> str:
        """Set of recipient batch indexes received."""
        return f"{self.prefix}campaign:{key}:batches"

    def recipients(self, key: str) -> str:
        """Hash: batch index → that batch's customer ids, joined by `store.ID_SEPARATOR`."""
        return f"{self.prefix}campaign:{key}:recipients"

    def recipient_codes(self, key: str) -> str:
        """Hash: batch index → that batch's own promo codes ("" for none), joined like the ids."""
        return f"{self.prefix}campaign:{key}:recipient-codes"

    def distinct_codes(self, key: str) -> str:
        """Set: the distinct per-customer promo codes seen (kept up to a bound; see store)."""
        return f"{self.prefix}campaign:{key}:codes"

    def sub_sends(self, key: str) -> str:
        """Hash: the send plan and each sub-send's record (group texts, personal chunks)."""
        return f"{self.prefix}campaign:{key}:sends"

    def personal_chunks(self, key: str) -> str:
        """Hash: chunk number → that chunk of personal texts, the JSON array of its `bulk_json`
        messages, cut when the contacts were loaded (see multi_send)."""
        return f"{self.prefix}campaign:{key}:personal-chunks"

    def chunks_loaded(self, key: str) -> str:
        """Set of chunk indexes TextLocal has accepted (chunks: see contact_index.resolve)."""
        return f"{self.prefix}campaign:{key}:chunks-loaded"

    def recipient_numbers(self, key: str) -> str:
        """Hash: number → what was published for its customer (one character: `-` nothing, else
        the outcome's status letter) followed by the customer id; the campaign's recipients as
        sent to, recorded while resolving them, kept until its window ends (consumer.outcomes)."""
        return f"{self.prefix}campaign:{key}:numbers"

    def campaign_lease(self, key: str) -> str:
        return f"{self.campaign_lease_prefix}{key}"

    @property
    def campaign_lease_prefix(self) -> str:
        return f"{self.prefix}lease:campaign:"

    def poll_lease(self, key: str) -> str:
        return f"{self.poll_lease_prefix}{key}"

    @property
    def poll_lease_prefix(self) -> str:
        return f"{self.prefix}lease:poll:"

    # --- across campaigns -----------------------------------------------------------------
    def event_seen(self, event_id: str) -> str:
        """Marks an input event id as processed (expires after the dedupe horizon)."""
        return f"{self.prefix}event:{event_id}"

    @property
    def work_queue(self) -> str:
        """Sorted set: campaigns the executor should look at, scored by due time (ms)."""
        return f"{self.prefix}queue:work"

    @property
    def collecting_queue(self) -> str:
        """Sorted set: campaigns still collecting batches, scored by their deadline (ms)."""
        return f"{self.prefix}queue:collecting"

    @property
    def poll_queue(self) -> str:
        """Sorted set: sent campaigns, scored by their next delivery poll (ms)."""
        return f"{self.prefix}queue:polls"

    @property
    def campaigns_index(self) -> str:
        """Sorted set: every campaign key, scored by its last update (ms), for listing.

        A campaign leaves it when its hash is gone (retention over): see `campaigns_in_state`.
        """
        return f"{self.prefix}campaigns"

    def campaigns_in_state(self, state: str) -> str:
        """Sorted set: the campaigns in `state`, scored by last update (ms) or last trim check.

        The store's Lua scripts keep a campaign in the set of its state and name these sets from
        the index key (`<campaigns_index>:state:<STATE>`), so the two must stay as written here.
        Counting them is the campaigns-by-state gauge; trimming them trims the index.
        """
        return f"{self.campaigns_index}:state:{state}"

    @property
    def campaign_states_indexed(self) -> str:
        """String: set once every campaign of the index was put in its state set (an upgrade
        from a version without the sets fills them once: `CampaignStore.index_campaign_states`)."""
        return f"{self.prefix}campaigns:states-indexed"

    @property
    def campaign_states_lease(self) -> str:
        return f"{self.prefix}lease:campaigns-states"

    @property
    def outbox(self) -> str:
        """Stream: output events recorded with the state change that caused them."""
        return f"{self.prefix}outbox"

    def handler_failures(self, role: str) -> str:
        """Hash: member of a role's queue → unexpected handler failures in a row."""
        return f"{self.prefix}failures:{role}"

    @property
    def outbox_set_aside(self) -> str:
        """Stream: output events Kafka refused permanently, kept for the operator."""
        return f"{self.prefix}outbox:set-aside"

    @property
    def outbox_lease(self) -> str:
        return f"{self.prefix}lease:outbox"

    # --- contact index, templates, daily jobs ----------------------------------------------
    def contacts_current(self, group_id: int) -> str:
        """String: the version id of the contact index readers use."""
        return f"{self.prefix}contacts:{group_id}:current"

    def contacts_version(self, group_id: int, version: str) -> str:
        """Hash: customer id → packed (number, first name, last name)."""
        return f"{self.prefix}contacts:{group_id}:v:{version}"

    @property
    def templates_catalog(self) -> str:
        """Hash: template id → JSON of the TextLocal template (title, body, sender)."""
        return f"{self.prefix}templates:catalog"

    @property
    def templates_published(self) -> str:
        """Hash: template id → fingerprint of what the catalog last published."""
        return f"{self.prefix}templates:published"

    @property
    def optouts_watermark(self) -> str:
        """String: TextLocal's time (Unix s) of the latest opt-out the daily import recorded."""
        return f"{self.prefix}optouts:watermark"

    @property
    def optouts_seen(self) -> str:
        """Sorted set: the opt-outs recorded (`optouts.optout_marker`: TextLocal's id, or a
        digest), scored by TextLocal's time of each (Unix s); trimmed behind the watermark."""
        return f"{self.prefix}optouts:seen"

    def optouts_lookup(self, token: str) -> str:
        """Set: the numbers one opt-out import looks up in the contact index (short-lived)."""
        return f"{self.prefix}optouts:lookup:{token}"

    def daily_job_lock(self, job: str, day: str) -> str:
        return f"{self.prefix}daily:{job}:{day}"

    def daily_job_last_success(self, job: str) -> str:
        return f"{self.prefix}daily:{job}:last-success"

    # --- delivery receipts (consumer.receipts) -----------------------------------------------
    @property
    def receipts(self) -> str:
        """Stream: receipts accepted and not yet turned into outcomes (its length is the
        backlog the listener bounds). Entries: ref, number, status, at."""
        return f"{self.prefix}receipts"

    def receipt_reference(self, reference: str) -> str:
        """String: the campaign key a send's `custom` reference stands for (set before the send,
        expiring with the receipts' retention). `reference` is `workflow.short_reference`:
        letters, digits, `_`, `.` and `-` only."""
        return f"{self.prefix}receipts:ref:{reference}"

    def receipts_seen(self, reference: str) -> str:
        """Hash: keyed digest of (reference, number, status) → 1, per receipt accepted (its
        de-duplication; no number in it), expiring with the reference."""
        return f"{self.prefix}receipts:seen:{reference}"

    @property
    def receipt_digest_key(self) -> str:
        """String: the random key of the receipts' digests, made once per deployment."""
        return f"{self.prefix}receipts:digest-key"

    @property
    def receipts_lease(self) -> str:
        return f"{self.prefix}lease:receipts"

    # --- TextLocal --------------------------------------------------------------------------
    def textlocal_rate_limit(self, account: str) -> str:
        """String: the account's shared rate limit (GCRA's next turn, µs of Redis' clock).

        `account` is `TextLocalCredentials.account_id`: a short hash, never a credential.
        """
        return f"{self.prefix}ratelimit:textlocal:{account}"
