"""The send plan's pure rules: template families, rendering, who reads which text."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from consumer.events import StatusError
from consumer.send_plan import (
    Recipient,
    SendPlan,
    personal_parts_bound,
    plan_sends,
    render,
    route,
    template_families,
    title_language,
)
from consumer.textlocal_types import Template
from consumer.workflow import MAX_MESSAGE_PARTS, MAX_PROMO_CODE_CHARS


def template(template_id: int, title: str, body: str) -> Template:
    return Template(id=template_id, title=title, body=body, sender_name=None)


FAMILY = template_families(
    [
        template(1, "OPT_Welcome", "Hi [%PROMO_CODE%]"),
        template(2, "OPT_Welcome [fr]", "Salut [%PROMO_CODE%]"),
        template(3, "OPT_Welcome [PT-br]", "Olá [%FIRST_NAME|você%] [%PROMO_CODE%]"),
        template(4, "OPT_Other", "Plain"),
        template(5, "OPT_Orphan [de]", "Hallo"),
    ]
)[1]


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("OPT_Welcome", ("OPT_Welcome", "")),
        ("OPT_Welcome [fr]", ("OPT_Welcome", "fr")),
        ("OPT_Welcome [pt-BR]", ("OPT_Welcome", "pt-br")),
        ("OPT_Welcome[fr]", ("OPT_Welcome[fr]", "")),  # the space is part of the convention
        ("OPT_Sale [x1]", ("OPT_Sale [x1]", "")),
    ],
)
def test_titles_name_their_family_and_language(title: str, expected: tuple[str, str]) -> None:
    """A variant is the family title, a space and a language code in brackets."""
    assert title_language(title) == expected


def test_families_group_variants_under_their_default() -> None:
    """Variants join the untagged default; a variant without one stands alone."""
    families = template_families(
        [template(5, "OPT_Orphan [de]", "Hallo"), template(1, "OPT_Welcome", "Hi")]
    )
    assert set(families) == {1, 5}
    assert FAMILY.languages == ["fr", "pt-br"]
    assert FAMILY.body_for("FR") == ("fr", "Salut [%PROMO_CODE%]")
    assert FAMILY.body_for("es") == ("", "Hi [%PROMO_CODE%]")


def test_names_render_with_their_fallback() -> None:
    """An empty name takes the placeholder's fallback; none given leaves nothing."""
    assert render("Hi [%FIRST_NAME|there%]!", None, "", "") == "Hi there!"
    assert render("Hi [%FIRST_NAME|there%]!", None, " Ann ", "") == "Hi Ann!"
    assert render("Dear [%FIRST_NAME%] [%LAST_NAME%]", None, "Ann", "") == "Dear Ann "
    assert render("Code [%PROMO_CODE%]", "X1") == "Code X1"


def test_a_plan_lists_group_texts_and_personal_variants() -> None:
    """Texts per (variant, code) for plain variants; a variant with names goes personal."""
    plan = plan_sends(FAMILY, ["SAVE"], ["A", "B"], False, max_group_texts=20)
    assert isinstance(plan, SendPlan)
    assert plan.personal_variants == ("pt-br",)
    assert [(t.variant, t.promo_code) for t in plan.texts] == [
        ("", "A"),
        ("", "B"),
        ("", "SAVE"),
        ("fr", "A"),
        ("fr", "B"),
        ("fr", "SAVE"),
    ]
    assert plan.campaign_code == "SAVE"
    assert SendPlan.from_json(plan.to_json()) == plan


def test_too_many_codes_make_a_variant_personal() -> None:
    """Beyond max_group_texts distinct codes, code texts go out one by one."""
    plan = plan_sends(FAMILY, [], [f"C{i}" for i in range(5)], False, max_group_texts=4)
    assert isinstance(plan, SendPlan)
    assert set(plan.personal_variants) == {"", "fr", "pt-br"}
    assert plan.texts == ()
    overflow = plan_sends(FAMILY, [], ["C1"], True, max_group_texts=20)
    assert isinstance(overflow, SendPlan)
    assert set(overflow.personal_variants) == {"", "fr", "pt-br"}


@pytest.mark.parametrize(
    ("campaign_codes", "code"),
    [((), "PROMO_CODE_MISSING"), (("A", "B"), "PROMO_CODE_AMBIGUOUS")],
)
def test_no_code_for_anyone_is_refused(campaign_codes: tuple[str, ...], code: str) -> None:
    """A code text with no code anywhere cannot be sent to anybody."""
    problem = plan_sends(FAMILY, campaign_codes, [], False, max_group_texts=20)
    assert isinstance(problem, StatusError)
    assert problem.code == code


def test_own_codes_win_and_the_rest_take_the_campaign_code() -> None:
    """A customer's own code first, the single campaign code second, else skipped."""
    plan = plan_sends(FAMILY, ["SAVE"], ["OWN"], False, max_group_texts=20)
    assert isinstance(plan, SendPlan)
    own = route(plan, FAMILY, Recipient("fr", "OWN"))
    assert plan.texts[own.text_index or 0].text == "Salut OWN"
    fallback = route(plan, FAMILY, Recipient("", None))
    assert plan.texts[fallback.text_index or 0].text == "Hi SAVE"
    personal = route(plan, FAMILY, Recipient("pt-BR", None, "", ""))
    assert personal.personal_text == "Olá você SAVE"
    no_campaign_code = plan_sends(FAMILY, [], ["OWN"], False, max_group_texts=20)
    assert isinstance(no_campaign_code, SendPlan)
    assert route(no_campaign_code, FAMILY, Recipient("", None)).skipped == "no_promo_code"
    unmatched = route(plan, FAMILY, Recipient("es", None))
    assert unmatched.fell_back_to_default


def test_the_executors_memoised_routes_are_the_rules_routes() -> None:
    """The executor's router (costs kept per code length) routes exactly as `route` does."""
    from consumer.contact_index import ResolvedContact
    from consumer.multi_send import _Router

    long_body = "x" * 740 + " [%PROMO_CODE%]"  # over 765 characters with a code of 11 or more
    family = template_families(
        [
            template(1, "OPT_Code", "Code [%PROMO_CODE%] at Shop & Co"),
            template(2, "OPT_Code [de]", "Größer Sale ❤ [%PROMO_CODE%] [%PROMO_CODE%]"),
            template(3, "OPT_Code [fr]", long_body),
            template(4, "OPT_Code [it]", "Ciao [%FIRST_NAME|amico%], [%PROMO_CODE%]"),
        ]
    )[1]
    codes = ["A1", "B2", "LONGERCODE12", "x" * 150, "A{B", "ÄÖ1", "A B", "", None]
    for campaign_codes in ((), ("SAVE",)):
        plan = plan_sends(family, campaign_codes, ["A1"], True, max_group_texts=20)
        assert isinstance(plan, SendPlan)
        router = _Router(plan, family, default_language="")
        for language in ("", "de", "fr", "it", "es"):
            for code in codes:
                fields = '"number":"447700900001","first_name":"Ann","last_name":""'
                contact = ResolvedContact("447700900001", language, fields, code or None)
                expected = route(plan, family, Recipient(language, code or None, "Ann", ""))
                assert router(contact) == expected, (campaign_codes, language, code)
                assert router(contact) == expected  # memoised: the same again


def test_the_cutter_writes_each_personal_text_as_the_rules_render_it() -> None:
    """Cut in runs (plain codes written straight into the chunk's JSON, anything else routed
    one at a time), the chunks hold each recipient's text as `route` renders it, in order, and
    the counts are the rules' counts."""
    import json

    from consumer.contact_index import VisitedContact
    from consumer.multi_send import _LoadTally, _PersonalCutter, _Router

    family = template_families(
        [
            template(1, "OPT_Code", 'Code [%PROMO_CODE%] at "Shop" & Co\\ [%PROMO_CODE%]'),
            template(2, "OPT_Code [de]", "Größer Sale ❤ [%PROMO_CODE%]"),
            template(3, "OPT_Code [fr]", "x" * 740 + " [%PROMO_CODE%]"),
            template(4, "OPT_Code [it]", "Ciao [%FIRST_NAME|amico%], [%PROMO_CODE%]"),
        ]
    )[1]
    codes = ["A1", "B2", "LONGERCODE12", "A{B", "ÄÖ1", "A B", None, "Z" * 30]
    fields = '"number":"4477009%05d","first_name":"Ann","last_name":""'
    contacts: list[VisitedContact] = [
        (f"4477009{k:05d}", language, fields % k, code)
        for k, (language, code) in enumerate(
            (language, code)
            for _ in range(3)
            for language in ("", "de", "fr", "it", "es", "de")
            for code in codes
        )
    ]
    for campaign_codes in ((), ("SAVE",)):
        plan = plan_sends(family, campaign_codes, ["A1"], True, max_group_texts=20)
        assert isinstance(plan, SendPlan)
        tally = _LoadTally()
        cutter = _PersonalCutter(_Router(plan, family, default_language=""), tally, chunk_size=7)
        for start in range(0, len(contacts), 10):  # runs as resolution hands them over
            cutter.visit(contacts[start : start + 10])
        cut = cutter.take_cut(last=True)
        sent = [message for _, chunk in cut for message in json.loads(chunk)]
        expected = [
            (number, routed)
            for number, language, _, code in contacts
            if not (routed := route(plan, family, Recipient(language, code, "Ann", ""))).skipped
        ]
        assert [(m["number"], m["text"]) for m in sent] == [
            (number, routed.personal_text) for number, routed in expected
        ]
        assert [number for number, _ in cut] == list(range(len(cut)))
        assert tally.personal_parts == sum(routed.parts for _, routed in expected)
        assert sum(tally.personal.values()) == len(expected)
        assert sum(tally.skipped.values()) == len(contacts) - len(expected)
        assert cutter.chunks.cut_so_far == [
            (len(json.loads(chunk)), any(r.unicode for _, r in expected[7 * n : 7 * n + 7]))
            for n, chunk in cut
        ]


GSM_OR_NOT = st.sampled_from([*"aZ9 €[]^{}|~", "é", "ß", "ж", "中", "\U0001f600"])


@settings(max_examples=300, deadline=None)
@example(prefix="a" * 150, suffix="", codes=["b" * MAX_PROMO_CODE_CHARS])  # GSM, past one part
@example(prefix="a" * 10, suffix="!", codes=["中" * MAX_PROMO_CODE_CHARS])  # unicode code
@example(prefix="€" * 40, suffix="", codes=["€" * MAX_PROMO_CODE_CHARS])  # extension table
@example(prefix="ж", suffix="", codes=["\U0001f600" * MAX_PROMO_CODE_CHARS])  # outside the BMP
@given(
    prefix=st.text(GSM_OR_NOT, max_size=200),
    suffix=st.text(GSM_OR_NOT, max_size=200),
    codes=st.lists(st.text(GSM_OR_NOT, min_size=1, max_size=MAX_PROMO_CODE_CHARS), min_size=1),
)
def test_the_parts_bound_is_never_below_a_personal_text_s_parts(
    prefix: str, suffix: str, codes: list[str]
) -> None:
    """Whatever codes intake lets through, no personal text sent costs more parts than the bound
    the credit check before rendering uses; a body with names is bounded by the most parts."""
    body = f"{prefix}[%PROMO_CODE%]{suffix}"
    family = template_families([template(1, "OPT_Code", body)])[1]
    plan = plan_sends(family, [], codes, True, max_group_texts=20)
    if isinstance(plan, StatusError):  # the body is too long even with a sample code
        return
    bound = personal_parts_bound(plan, family)
    for code in codes:
        routed = route(plan, family, Recipient("", code))
        if routed.skipped is None:
            assert 1 <= routed.parts <= bound
    named = template_families([template(1, "OPT_Hi", "Hi [%FIRST_NAME%]")])[1]
    named_plan = plan_sends(named, [], [], False, max_group_texts=20)
    assert isinstance(named_plan, SendPlan)
    assert personal_parts_bound(named_plan, named) == MAX_MESSAGE_PARTS
