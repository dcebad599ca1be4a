"""Per-recipient content, as pure rules (DESIGN §4a): template families, texts, the send plan.

TextLocal's API has neither multilingual campaigns nor merge fields, so the daemon renders each
recipient's text itself and groups recipients by it:

- **Language variants.** Templates form a family by title: `OPT_Welcome` is the family's default
  variant, `OPT_Welcome [fr]`, `OPT_Welcome [pt-BR]` its variants (a space, then a language code
  in square brackets at the end of the title: 2–3 letters, optionally a region). Every title
  still starts with the family's prefix, so the per-group prefix filter keeps them all. The
  catalog publishes the family once (the default's id, with its languages); a campaign names the
  default's template id. A recipient whose contact language has no variant, or who has none,
  gets the default (counted).
- **Promo codes.** A customer's own code wins; otherwise the campaign-level code when there is
  exactly one. A recipient left without a code when the text needs one is skipped (counted).
- **Personal fields.** `[%FIRST_NAME%]` and `[%LAST_NAME%]` from the contact index; an empty
  value takes the fallback written in the placeholder (`[%FIRST_NAME|there%]`), else nothing.
- **The plan.** A variant whose body has personal fields, or that would need more distinct codes
  than `max_group_texts`, goes out personally (`bulk_json` chunks); every other variant gives one
  text per code, each text one segment group and one group send.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from consumer.events import StatusError
from consumer.textlocal_types import Template
from consumer.workflow import (
    MAX_MESSAGE_CHARS,
    MAX_MESSAGE_PARTS,
    MAX_PROMO_CODE_CHARS,
    PROMO_CODE_PLACEHOLDER,
    MessageCost,
    message_cost,
)

DEFAULT_VARIANT = ""  # the language key of a family's default variant
_LANGUAGE_SUFFIX = re.compile(
    r"^(?P<family>.*\S)\s+\[(?P<language>[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})?)\]$"
)
_NAME_PLACEHOLDER = re.compile(r"\[%(?P<field>FIRST_NAME|LAST_NAME)(?:\|(?P<fallback>[^%\]]*))?%\]")


def normalise_language(code: str) -> str:
    """`pt-br`, `PT-BR` → `pt-br`: languages compare case-insensitively."""
    return code.strip().lower()


def title_language(title: str) -> tuple[str, str]:
    """(the family's title, the variant's language or DEFAULT_VARIANT)."""
    match = _LANGUAGE_SUFFIX.match(title)
    if match is None:
        return title, DEFAULT_VARIANT
    return match["family"], normalise_language(match["language"])


@dataclass(frozen=True)
class TemplateFamily:
    """A default template and its language variants (language → body)."""

    default: Template
    variants: Mapping[str, str]

    @property
    def languages(self) -> list[str]:
        return sorted(self.variants)

    def body_for(self, language: str) -> tuple[str, str]:
        """(the variant's language key, its body): the default when there is no such variant."""
        key = normalise_language(language)
        if key in self.variants:
            return key, self.variants[key]
        return DEFAULT_VARIANT, self.default.body

    def bodies(self) -> dict[str, str]:
        return {DEFAULT_VARIANT: self.default.body, **self.variants}


def template_families(templates: Sequence[Template]) -> dict[int, TemplateFamily]:
    """Each family by its default template's id.

    A tagged template whose family has no untagged default stands alone (its own default), so
    nothing TextLocal holds becomes unreachable.
    """
    defaults: dict[str, Template] = {}
    tagged: dict[str, list[tuple[str, Template]]] = {}
    for template in sorted(templates, key=lambda t: t.id):
        family, language = title_language(template.title)
        if language == DEFAULT_VARIANT:
            defaults.setdefault(family, template)
        else:
            tagged.setdefault(family, []).append((language, template))
    families: dict[int, TemplateFamily] = {}
    for family, default in defaults.items():
        variants = {language: t.body for language, t in tagged.pop(family, [])}
        families[default.id] = TemplateFamily(default, variants)
    for members in tagged.values():
        for _, template in members:
            families[template.id] = TemplateFamily(template, {})
    return families


def is_personal(body: str) -> bool:
    return _NAME_PLACEHOLDER.search(body) is not None


def render(body: str, promo_code: str | None, first_name: str = "", last_name: str = "") -> str:
    """The text a recipient reads (the caller checked that a needed code is there)."""
    if promo_code is not None:
        body = body.replace(PROMO_CODE_PLACEHOLDER, promo_code)
    if "[%" not in body:
        return body
    names = {"FIRST_NAME": first_name.strip(), "LAST_NAME": last_name.strip()}
    return _NAME_PLACEHOLDER.sub(lambda m: names[m["field"]] or (m["fallback"] or ""), body)


def needs_code(body: str) -> bool:
    return PROMO_CODE_PLACEHOLDER in body


def text_problem(text: str, cost: MessageCost | None = None) -> StatusError | None:
    """Why a rendered text cannot be sent (empty, or longer than TextLocal sends whole).

    `cost`: the text's `message_cost`, when the caller has it already.
    """
    if not text.strip():
        return StatusError("EMPTY_MESSAGE", "the template body is empty")
    if len(text) > MAX_MESSAGE_CHARS:
        return StatusError(
            "MESSAGE_TOO_LONG",
            f"a message has {len(text)} characters; TextLocal sends at most {MAX_MESSAGE_CHARS}",
        )
    if (cost or message_cost(text)).parts > MAX_MESSAGE_PARTS:
        return StatusError(
            "MESSAGE_TOO_LONG",
            f"a message needs more than {MAX_MESSAGE_PARTS} parts; TextLocal sends at most that",
        )
    return None


@dataclass(frozen=True)
class PlannedText:
    """One group text of the plan: the variant it renders and the code in it."""

    variant: str
    promo_code: str | None
    text: str


@dataclass(frozen=True)
class SendPlan:
    """Which variants go out personally, and the group texts of the others (in a fixed order).

    `campaign_code` is the code of a recipient without one of their own (None: no single one).
    """

    personal_variants: tuple[str, ...]
    texts: tuple[PlannedText, ...]
    campaign_code: str | None

    @property
    def is_single_text(self) -> bool:
        """Everyone reads the same text: the plain one-segment, one-send path."""
        return not self.personal_variants and len(self.texts) == 1

    def text_index(self, variant: str, promo_code: str | None) -> int | None:
        for index, planned in enumerate(self.texts):
            if planned.variant == variant and planned.promo_code == promo_code:
                return index
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "personal": list(self.personal_variants),
            "texts": [[t.variant, t.promo_code, t.text] for t in self.texts],
            "campaign_code": self.campaign_code,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> SendPlan:
        texts = raw.get("texts") or []
        assert isinstance(texts, list)
        personal = raw.get("personal") or []
        assert isinstance(personal, list)
        code = raw.get("campaign_code")
        return cls(
            personal_variants=tuple(str(v) for v in personal),
            texts=tuple(
                PlannedText(str(v), None if c is None else str(c), str(t)) for v, c, t in texts
            ),
            campaign_code=None if code is None else str(code),
        )


def plan_sends(
    family: TemplateFamily,
    campaign_codes: Sequence[str],
    customer_codes: Sequence[str],
    customer_codes_overflow: bool,
    max_group_texts: int,
) -> SendPlan | StatusError:
    """The plan for a campaign: personal variants, and every group text someone may receive.

    `customer_codes` are the distinct per-customer codes intake saw (`overflow`: more than it
    kept). Texts are listed in a fixed order (variant, then code), so a restarted executor finds
    the same text at the same index.
    """
    distinct_campaign = sorted(set(campaign_codes))
    campaign_code = distinct_campaign[0] if len(distinct_campaign) == 1 else None
    codes = sorted(set(customer_codes) | ({campaign_code} if campaign_code else set()))
    bodies = family.bodies()
    if (
        not customer_codes
        and not customer_codes_overflow
        and any(needs_code(body) for body in bodies.values())
    ):
        if not distinct_campaign:
            return StatusError(
                "PROMO_CODE_MISSING",
                f"the template uses {PROMO_CODE_PLACEHOLDER} but neither the campaign nor its "
                "customers have a promo code",
            )
        if campaign_code is None:
            return StatusError(
                "PROMO_CODE_AMBIGUOUS",
                f"the campaign has {len(distinct_campaign)} promo codes and its customers none "
                "of their own: no code to give anyone",
            )
    personal: list[str] = []
    texts: list[PlannedText] = []
    for variant in sorted(bodies):
        body = bodies[variant]
        many_codes = customer_codes_overflow or len(codes) > max_group_texts
        if is_personal(body) or (needs_code(body) and many_codes):
            personal.append(variant)
            sample = render(body, codes[0] if codes else "CODE", "Firstname", "Lastname")
            if problem := text_problem(sample):
                return problem
            continue
        for code in codes if needs_code(body) else [None]:
            text = render(body, code)
            if problem := text_problem(text):
                return problem
            texts.append(PlannedText(variant, code, text))
    return SendPlan(tuple(personal), tuple(texts), campaign_code)


# The costliest codes intake lets through (MAX_PROMO_CODE_CHARS): in a GSM-7 text, characters
# of the extension table (two units each); in a unicode one, characters outside the BMP (two
# UTF-16 units each).
_COSTLIEST_CODES = ("€" * MAX_PROMO_CODE_CHARS, "\U0001f600" * MAX_PROMO_CODE_CHARS)


def personal_parts_bound(plan: SendPlan, family: TemplateFamily) -> int:
    """The most parts any one personal text of the plan can take, whoever reads it.

    A body with personal fields may take any length of name: MAX_MESSAGE_PARTS, the most a
    text that is sent may have (a longer one is skipped). A body with a promo code only: the
    body with the costliest code intake accepts. Used for a credit check before the texts are
    rendered (`MultiSend`, sending chunks as they are cut): it must never be below the truth.
    """
    bound = 0
    bodies = family.bodies()
    for variant in plan.personal_variants:
        body = bodies.get(variant, family.default.body)
        if is_personal(body):
            return MAX_MESSAGE_PARTS
        parts = max(message_cost(render(body, code)).parts for code in _COSTLIEST_CODES)
        bound = max(bound, min(parts, MAX_MESSAGE_PARTS))
    return bound


class Recipient(NamedTuple):
    """What the plan needs to know of one resolved recipient (a tuple: one per recipient)."""

    language: str
    promo_code: str | None  # the customer's own
    first_name: str = ""
    last_name: str = ""


class Routed(NamedTuple):
    """Where a recipient goes: a group text (by index), or a personal text; or nowhere.

    A personal text comes with its cost (`parts`, `unicode`), computed once.
    """

    text_index: int | None = None
    personal_text: str | None = None
    variant: str = DEFAULT_VARIANT
    fell_back_to_default: bool = False
    skipped: str | None = None  # the reason, when the recipient is not sent to
    parts: int = 0
    unicode: bool = False


class VariantChoice(NamedTuple):
    """What routing needs of a recipient's language: the same for everyone who speaks it."""

    variant: str
    body: str
    fell_back: bool  # the default, in a family that has variants
    takes_code: bool  # the body has the promo-code placeholder
    personal: bool  # the plan sends this variant's texts personally
    uses_names: bool  # the body has personal fields


def choose_variant(plan: SendPlan, family: TemplateFamily, language: str) -> VariantChoice:
    variant, body = family.body_for(language)
    return VariantChoice(
        variant=variant,
        body=body,
        fell_back=variant == DEFAULT_VARIANT and bool(family.variants),
        takes_code=needs_code(body),
        personal=variant in plan.personal_variants,
        uses_names=is_personal(body),
    )


def route(plan: SendPlan, family: TemplateFamily, recipient: Recipient) -> Routed:
    """The recipient's text under the plan (DESIGN §4a's rules)."""
    choice = choose_variant(plan, family, recipient.language)
    return route_in(plan, choice, recipient.promo_code, recipient.first_name, recipient.last_name)


def route_in(
    plan: SendPlan,
    choice: VariantChoice,
    promo_code: str | None,
    first_name: str = "",
    last_name: str = "",
) -> Routed:
    """`route` once the recipient's variant is chosen (a caller may choose once per language)."""
    variant, fell_back = choice.variant, choice.fell_back
    code = promo_code or plan.campaign_code
    if choice.takes_code and not code:
        return Routed(None, None, variant, fell_back, "no_promo_code")
    if choice.personal:
        text = render(choice.body, code, first_name, last_name)
        cost = message_cost(text)
        if text_problem(text, cost) is not None:
            return Routed(None, None, variant, fell_back, "text_too_long")
        return Routed(None, text, variant, fell_back, None, cost.parts, cost.unicode)
    index = plan.text_index(variant, code if choice.takes_code else None)
    if index is None:  # a code intake did not keep (cannot happen below the overflow bound)
        return Routed(None, None, variant, fell_back, "unplanned_code")
    return Routed(index, None, variant, fell_back)
