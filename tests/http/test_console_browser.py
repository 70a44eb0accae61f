"""The console in a real browser (headless Chromium, ``tests/fixtures/browser.py``) against a
real service: the live stream shows a published event and its delivery, the filter narrows it
and shows a bad pattern's error, events found by type open their trail, which shows every
attempt, dead letters are replayed from the page after a confirmation showing their count, the
rules sandbox shows a match for an event typed or picked from the recent ones, a broken rule
file's error (file and line) shows on reload, and a target shows its deliveries in flight and
its recent rates. With API keys the page asks for one. A real ``eventbus serve --workers 2``
process shows every worker's events and counts every worker's deliveries.

``CONSOLE_SCREENSHOTS=DIR`` saves a screenshot of each page there (docs/console.md); not an
``EVENTBUS_*`` name, which a real ``eventbus serve`` would read as a setting.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest
from aiohttp import web

from tests.fixtures.browser import Page
from tests.fixtures.receiver import Receiver, Response
from tests.fixtures.service import RunningService, ServeProcess, StartService
from tests.fixtures.wait import eventually

FAST = {"strategy": "fixed", "initial_delay": "50ms", "max_attempts": 5, "jitter": False}
RULES = """
- name: orders
  match:
    type: [com.example.order.created]
  targets: [fn]
- name: summary
  match:
    type: [com.example.order.created]
  transform:
    input_paths: {total: $.data.total}
    template: {"amount": <total>}
  targets: [fn]
"""
ROW = "#live-rows tr[data-id=%r]"
# The page's fetch, holding back the (real) answer to a request whose body is arguments[0]
# until the test calls window.held.pop()(): answers that arrive out of order, on demand.
HOLD_ANSWER = """
const body = arguments[0];
const real = window.fetch;
window.held = [];
window.handedOver = false;
window.fetch = async (url, init) => {
  const resp = await real(url, init);
  if (init && init.body === body) {
    await new Promise((resolve) => window.held.push(resolve));
    window.handedOver = true;
  }
  return resp;
};
"""


def _event(i: str, **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": i,
        "source": "tests/console",
        "type": "com.example.order.created",
        "subject": f"order-{i}",
        "data": {"total": 150},
        **extra,
    }


async def _start(
    eventbus: StartService, receiver: Receiver, delivery: dict[str, Any] | None = None, **kw: Any
) -> RunningService:
    target = {"name": "fn", "type": "http", "url": receiver.url("/fn")}
    if delivery is not None:
        target["delivery"] = delivery
    return await eventbus(rules=RULES, targets=[target], **kw)


async def _shot(page: Page, name: str) -> None:
    where = os.environ.get("CONSOLE_SCREENSHOTS")
    if where:
        await page.screenshot(Path(where) / f"{name}.png")


async def _confirm(page: Page, needle: str) -> str:
    """The text of the confirmation dialog once it is open and says ``needle``."""
    script = (
        "const d = document.getElementById('confirm');"
        "return d.open && d.textContent.includes(arguments[0]) ? d.textContent : null"
    )
    return str(await page.wait(script, needle, what=f"a confirmation saying {needle!r}"))


async def _live(page: Page, pattern: str = "") -> None:
    """Wait until the live page streams with ``pattern`` applied."""
    await page.wait(
        "return document.getElementById('live-status').dataset.pattern === arguments[0]",
        pattern,
        what=f"the live stream connected with pattern {pattern!r}",
    )


async def _on_the_live_page(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> tuple[RunningService, Page]:
    """The service (``_start``) and its console open on the live page, the stream connected."""
    svc = await _start(eventbus, receiver)
    page = browser(svc.url)
    await page.open("/console")
    await _live(page)
    return svc, page


async def test_live_stream_filter_and_pause(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    svc, page = await _on_the_live_page(eventbus, receiver, browser)
    assert (await svc.post_event(_event("one")))[0] == 202
    await page.wait_text(ROW % "one", "delivered")
    row = await page.text(ROW % "one")
    assert "tests/console" in row and "order-one" in row and "2: orders, summary" in row
    await _shot(page, "live")

    await page.fill("#live-filter", '{"subject": [{"prefix": 1}]}')
    error = await page.wait_text("#live-filter-error", "subject")
    assert "prefix" in error, error
    # answers arriving out of order: the service's answer for an older text is held back
    # (in the page, after it came) until the newer text applies; it must change nothing
    older = '{"subject": ["order-drop"]}'
    await page.js(HOLD_ANSWER, older)
    await page.fill("#live-filter", older)
    await page.wait("return window.held.length === 1", what="the older text's answer held")
    pattern = '{"subject": ["order-keep"]}'
    await page.fill("#live-filter", pattern)
    await _live(page, pattern)
    await page.js("window.held.pop()()")
    await page.wait("return window.handedOver", what="the older answer handed to the page")
    assert await page.text("#live-filter-error") == ""
    assert (await svc.post_event(_event("drop")))[0] == 202
    await svc.drained()
    assert (await svc.post_event(_event("keep")))[0] == 202
    await page.wait_text(ROW % "keep", "delivered")
    assert await page.js("return document.querySelectorAll('#live-rows tr').length") == 1
    assert await page.js("return document.getElementById('live-status').dataset.pattern") == (
        pattern
    )

    await page.click("#live-pause")
    assert (await svc.post_event(_event("keep", id="later")))[0] == 202
    await page.wait_text("#live-status", "paused, 1 waiting")  # events, not their rows
    assert await page.js("return document.querySelectorAll('#live-rows tr').length") == 1
    await page.click("#live-pause")
    await page.wait_text(ROW % "later", "delivered")


async def test_a_row_whose_delivery_ends_while_paused_shows_it_on_resume(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    # Paused, the oldest rows waiting went first past the page's bound, the update of a row
    # shown among them: after Resume it read "routing" for good, its trail "delivered".
    svc, page = await _on_the_live_page(eventbus, receiver, browser)
    receiver.script(Response(delay=2.0), Response(delay=2.0))  # both deliveries of "slow"
    assert (await svc.post_event(_event("slow")))[0] == 202
    await page.wait_text(ROW % "slow", "routing")
    await page.click("#live-pause")
    await svc.trail("tests/console", "slow", attempts=2)  # delivered, while paused
    for n in range(520):  # a row each (no rule matches): past the 500 kept while paused
        assert (await svc.post_event(_event(f"burst-{n}", type="com.example.other")))[0] == 202
    # every row has come (each later one would push the oldest out of the 500 shown): 521
    # waiting, "slow"'s update kept, and of the 520 others the 21 oldest events gone
    await page.wait_text("#live-status", "21 older events skipped while paused", within=30)
    await page.click("#live-pause")
    await page.wait_text(ROW % "slow", "delivered")


async def test_paused_the_page_keeps_the_newest_500_events_not_500_rows(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    # Each delivered event sends a row when routed and one when its deliveries end: bounded in
    # rows, the 500 kept while paused were some 250 events, and 270 of these 520 were skipped.
    svc, page = await _on_the_live_page(eventbus, receiver, browser)
    await page.click("#live-pause")
    for n in range(520):
        assert (await svc.post_event(_event(f"many-{n}")))[0] == 202
    await svc.drained()
    await page.wait_text("#live-status", "paused, 500 waiting; 20 older events skipped", within=30)
    await page.click("#live-pause")
    await page.wait_text(ROW % "many-519", "delivered")
    await page.wait_text(ROW % "many-20", "delivered")
    shown = "return document.querySelectorAll('#live-rows tr').length"
    assert await page.js(shown) == 500
    assert await page.js(f"return document.querySelectorAll({ROW % 'many-19'!r}).length") == 0


async def test_trail_page_shows_every_attempt(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    svc = await _start(eventbus, receiver, {"retry": FAST, "circuit_breaker": False})
    page = browser(svc.url)
    await page.open("/console")
    await _live(page)
    assert (await svc.post_event(_event("tr-0", type="com.example.other")))[0] == 202
    receiver.script(503, 503)
    assert (await svc.post_event(_event("tr-1")))[0] == 202
    await svc.trail("tests/console", "tr-1", attempts=4)
    # the live row follows the deliveries the retry schedule made, rules and time kept
    row = await page.wait_text(ROW % "tr-1", "delivered")
    assert "2: orders, summary" in row and "retrying" not in row, row
    assert await page.js(
        "return document.querySelector(arguments[0]).cells[0].textContent", ROW % "tr-1"
    )
    await page.click("nav a[data-page=trail]")
    # found by its type (the other event is not), and opened from the list
    await page.fill("#search-since", "yesterday")
    await page.click("#search-go")
    await page.wait_text("#search-error", "since must be an ISO 8601 time")
    await page.fill("#search-since", "")
    await page.fill("#search-type", "com.example.order.created")
    await page.click("#search-go")
    found = await page.wait_text("#search-rows", "tr-1")
    assert "tr-0" not in found and "http" in found, found
    assert await page.js("return document.querySelectorAll('#search-rows tr').length") == 1
    await page.click("#search-rows tr[data-id=tr-1]")
    await page.wait_text("#trail-attempts", "delivered")
    assert await page.js("return document.getElementById('trail-id').value") == "tr-1"
    attempts = await page.js(
        "return [...document.querySelectorAll('#trail-attempts li')].map(li => li.textContent)"
    )
    assert len(attempts) == 4, attempts
    assert sum("retry-scheduled" in a for a in attempts) == 2, attempts
    assert sum("HTTP 503" in a for a in attempts) == 2, attempts
    assert all(" ms" in a for a in attempts), attempts
    event = orjson.loads(await page.text("#trail-event"))
    assert event["id"] == "tr-1" and event["data"] == {"total": 150}
    assert "orders → fn" in await page.text("#trail-matches")
    await _shot(page, "trail")
    assert "only the latest" not in await page.text("#trail-received")
    # a trail longer than the API gives whole says so (it read as the whole of it)
    await svc.service.store.pool.execute(
        "INSERT INTO attempts (source, id, rule, target, attempt, outcome, duration_ms, at)"
        " SELECT 'tests/console', 'tr-0', 'orders', 'fn', n, 'failed', 1, now()"
        " FROM generate_series(1, 1001) AS n"
    )
    await page.fill("#trail-source", "tests/console")
    await page.fill("#trail-id", "tr-0")
    await page.click("#trail-go")
    await page.wait_text("#trail-received", "only the latest 1,000 matches and attempts are shown")
    await page.fill("#trail-id", "tr-1")
    await page.click("#trail-go")
    await page.wait_text("#trail-attempts", "delivered")
    await page.click("#trail-sandbox")  # the event, into the rules sandbox
    await page.wait("return location.hash === '#rules'")
    await page.click("#sandbox-run")
    await page.wait_text("#sandbox-result", "summary → fn")


async def test_the_live_stream_says_why_it_is_refused(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    # The service refuses a watcher past its limit (32) with the reason in the stream; the page
    # showed it for a moment, then "reconnecting…" alone, every 2 s, for as long as it lasted.
    svc = await _start(eventbus, receiver)
    watchers = []
    try:
        for _ in range(32):
            resp = await svc.session.get(svc.url + "/events/live")
            assert resp.status == 200
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"retry:")
            watchers.append(resp)
        page = browser(svc.url)
        await page.open("/console")
        status = await page.wait_text("#live-status", "reconnecting")
        assert "32 watchers already: try again later" in status, status
        watchers.pop().close()  # room again (once the service sees it gone): the page connects
        await page.wait(
            "return document.getElementById('live-status').textContent === 'live'",
            within=30,
            what="the live stream connected once there is room",
        )
    finally:
        for resp in watchers:
            resp.close()


async def test_live_row_opens_its_trail(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    svc, page = await _on_the_live_page(eventbus, receiver, browser)
    # the function answers one of its two deliveries with an event: a reply, on the bus
    reply = {"specversion": "1.0", "id": "re-1", "source": "tests/fn", "type": "t.reply"}
    receiver.script(Response(200, reply=reply))
    assert (await svc.post_event(_event("click-me")))[0] == 202
    await page.wait_text(ROW % "click-me", "delivered")
    await svc.trail("tests/fn", "re-1")
    await svc.trail("tests/console", "click-me", attempts=2)
    await page.click(ROW % "click-me")
    await page.wait_text("#trail-attempts", "delivered")
    assert await page.js("return location.hash") == "#trail"
    # the trails link both ways: the event to its reply, the reply to the event it answers
    await page.wait_text("#trail-caused", "tests/fn re-1")
    await page.click("#trail-caused a.trail-link")
    await page.wait_text("#trail-cause", "a function's reply to tests/console click-me")
    assert await page.js("return document.getElementById('trail-id').value") == "re-1"
    assert await page.js("return document.getElementById('trail-replies').hidden")
    await page.click("#trail-cause a.trail-link")
    await page.wait_text("#trail-caused", "tests/fn re-1")
    assert await page.js("return document.getElementById('trail-id').value") == "click-me"
    assert await page.js("return document.getElementById('trail-cause').hidden")
    # a subject that reorders itself (a right-to-left override) is shown as its escape: the
    # row read "reportexe.pdf"; and a tag character (beyond U+FFFF), invisible
    await page.click("a[href='#live']")
    await _live(page)
    hidden = {"data": {"total": 150, "note": "a\U000e0041b"}}
    assert (await svc.post_event(_event("bidi", subject="report\u202efdp.exe", **hidden)))[0] == 202
    shown = await page.wait_text(ROW % "bidi", "delivered")
    assert "report\\u202efdp.exe" in shown and "\u202e" not in shown, shown
    await page.click(ROW % "bidi")
    # its own trail, not the one before it still shown (its attempts read "delivered" too)
    await page.wait_text("#trail-event", '"id": "bidi"')
    await page.wait_text("#trail-attempts", "delivered")
    payload = await page.text("#trail-event")
    assert '"subject": "report\\u202efdp.exe"' in payload and "\u202e" not in payload, payload
    assert '"note": "a\\udb40\\udc41b"' in payload, payload


async def test_dead_letters_replayed_after_confirmation(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    svc = await _start(eventbus, receiver, {"retry": "none", "circuit_breaker": False})
    receiver.respond(500)
    page = browser(svc.url)
    await page.open("/console")
    await _live(page)
    for i in range(3):
        assert (await svc.post_event(_event(f"dl-{i}")))[0] == 202
    await svc.drained()
    for i in range(3):  # seen failing live
        await page.wait_text(ROW % f"dl-{i}", "dead-lettered")
    receiver.respond(200)
    receiver.reset()
    await page.click("nav a[data-page=dead]")
    await page.wait("return document.querySelectorAll('#dl-rows tr').length === 6")
    await _shot(page, "dead-letters")

    # one, from its detail view
    await page.click("#dl-rows tr")
    await page.wait_text("#dl-detail-body", '"history"')
    await page.click("#dl-replay-one")
    await _confirm(page, "Replay dead letter #")
    await page.click("#confirm-ok")
    await page.wait_text("#dl-message", "replayed #")
    await page.wait("return document.querySelectorAll('#dl-rows tr').length === 5")

    # the filtered set: the confirmation counts them; cancel changes nothing
    await page.fill("#dl-rule", "summary")
    await page.click("#dl-search")
    await page.wait("return document.querySelectorAll('#dl-rows tr').length <= 3")
    remaining = await page.js("return document.querySelectorAll('#dl-rows tr').length")
    await page.click("#dl-replay-all")
    text = await _confirm(page, "matching the filter")
    assert f"Replay {remaining} dead letter" in text, text
    await page.click("#confirm-cancel")
    assert await page.js("return document.getElementById('confirm').open") is False
    await page.click("#dl-replay-all")
    await _confirm(page, f"Replay {remaining} dead letter")
    # one more matching the filter while the dialog waits: not among those counted, not replayed
    receiver.respond(500)
    assert (await svc.post_event(_event("dl-late")))[0] == 202
    await svc.drained()

    async def late_dead_lettered() -> bool:
        _, _, listed = await svc.request("GET", "/dead-letters?rule=summary")
        return any(item["event_id"] == "dl-late" for item in listed["items"])

    await eventually(late_dead_lettered, what="the late dead letter")
    receiver.respond(200)
    receiver.reset()
    await page.click("#confirm-ok")
    await page.wait_text("#dl-message", f"replayed {remaining}")
    await receiver.wait_for(remaining)
    _, _, left = await svc.request("GET", "/dead-letters")
    assert len(left["items"]) == 5 - remaining + 2  # the late event's two (orders, summary)
    assert [item["event_id"] for item in left["items"] if item["rule"] == "summary"] == ["dl-late"]

    # failures say why on the page: a dead letter gone meanwhile, a count that cannot be made
    await page.fill("#dl-rule", "")
    await page.click("#dl-search")
    gone = left["items"][0]["id"]
    # the unfiltered list rendered (a row of the filtered one, found first, went stale)
    shown = len(left["items"])
    await page.wait(f"return document.querySelectorAll('#dl-rows tr').length === {shown}")
    await page.wait(f"return document.querySelector(\"#dl-rows tr[data-id='{gone}']\")")
    assert (await svc.request("DELETE", f"/dead-letters/{gone}"))[0] == 200
    await page.click(f"#dl-rows tr[data-id='{gone}']")
    await page.wait_text("#dl-message", f"no dead letter {gone}")
    # a filter typed but not searched: not the list shown, which is what a replay acted on
    await page.fill("#dl-rule", "orders")
    await page.click("#dl-replay-all")
    await page.wait_text("#dl-message", "not the one of the list shown: press Filter")
    assert await page.js("return document.getElementById('confirm').open") is False
    await page.fill("#dl-since", "yesterday")
    await page.click("#dl-search")
    await page.wait_text("#dl-message", "since must be an ISO 8601 time")
    await page.click("#dl-replay-all")  # no list shown under that error
    await page.wait_text("#dl-message", "press Filter")
    assert await page.js("return document.getElementById('confirm').open") is False

    # the replay and its delivery, in the trail of a replayed event
    await page.click("nav a[data-page=trail]")
    await svc.trail("tests/console", "dl-0", attempts=4)  # every event's summary: replayed
    await page.fill("#trail-source", "tests/console")
    await page.fill("#trail-id", "dl-0")
    await page.click("#trail-go")
    attempts = await page.wait_text("#trail-attempts", "replay-requested")
    assert "dead-lettered" in attempts and "delivered" in attempts, attempts


async def test_rules_page_sandbox_and_reload(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    svc = await _start(eventbus, receiver)
    assert (await svc.post_event(_event("pick-1", data={"total": 42})))[0] == 202
    await svc.drained()
    receiver.reset()
    page = browser(svc.url)
    await page.open("/console#rules")
    rules = await page.wait_text("#rules-rows", "summary")
    assert "rules.yaml:2" in rules and "com.example.order.created" in rules
    # a recent event, picked from the list, fills the sandbox whole
    await page.wait_text("#sandbox-pick", "pick-1")
    await page.click("#sandbox-pick option[data-id=pick-1]")
    await page.wait(
        "return document.getElementById('sandbox-event').value.includes('\"id\": \"pick-1\"')",
        what="the picked event in the sandbox",
    )
    picked = orjson.loads(await page.js("return document.getElementById('sandbox-event').value"))
    assert picked == _event("pick-1", data={"total": 42})
    await page.click("#sandbox-run")
    await page.wait_text("#sandbox-result", '"amount": 42')
    await page.fill("#sandbox-event", orjson.dumps(_event("sb-1")).decode())
    await page.click("#sandbox-run")
    result = await page.wait_text("#sandbox-result", "summary → fn")
    assert "2 route(s) from 2 rules" in result and '"amount": 150' in result, result
    await _shot(page, "rules")
    await page.fill("#sandbox-event", orjson.dumps(_event("sb-2", type="other")).decode())
    await page.click("#sandbox-run")
    result = await page.wait_text("#sandbox-result", "0 route(s)")
    assert "orders did not match: pattern: type: 'other' does not match" in result, result
    await page.fill("#sandbox-event", '{"id": 1}')
    await page.click("#sandbox-run")
    await page.wait_text("#sandbox-error", "attribute 'id' must be a string")

    broken = Path(svc.service.settings.rules) / "broken.yaml"
    broken.write_text("- name: broken\n  match: {type: [x]}\n  targets: [nowhere]\n")
    await page.click("#rules-reload")
    error = await page.wait_text("#rules-message", "broken.yaml:")
    assert "broken.yaml:3 rule 'broken'" in error and "nowhere" in error, error
    broken.unlink()
    await page.click("#rules-reload")
    await page.wait_text("#rules-message", "reloaded: 2 rules")
    await svc.drained()
    assert receiver.requests == []  # the sandbox published nothing


async def test_the_next_page_of_found_events_is_of_the_list_shown(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    # "Next page" read the fields as edited since: the list went on with another search's
    # events, from the first one's cursor.
    svc = await _start(eventbus, receiver)
    for n in range(52):
        assert (await svc.post_event(_event(f"np-{n}")))[0] == 202
    assert (await svc.post_event(_event("np-other", type="com.example.other")))[0] == 202
    await svc.trail("tests/console", "np-other")
    await svc.trail("tests/console", "np-51")
    page = browser(svc.url)
    await page.open("/console#trail")
    await page.fill("#search-type", "com.example.order.created")
    await page.click("#search-go")
    await page.wait("return document.querySelectorAll('#search-rows tr').length === 50")
    await page.fill("#search-type", "com.example.other")  # edited, not searched
    await page.click("#search-next")
    await page.wait("return document.querySelectorAll('#search-rows tr').length > 50")
    ids = await page.js(
        "return [...document.querySelectorAll('#search-rows tr')].map(tr => tr.dataset.id)"
    )
    assert sorted(ids) == sorted(f"np-{n}" for n in range(52)), ids


async def test_page_asks_for_an_api_key(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    key = "console-admin-key-0001"
    svc = await _start(
        eventbus,
        receiver,
        settings={
            "api_keys": [
                {"name": "ops", "key": key, "scopes": ["admin"]},
                {"name": "pub", "key": "console-publish-key-01", "scopes": ["publish"]},
            ]
        },
    )
    page = browser(svc.url)
    await page.open("/console")
    await page.wait("return !document.getElementById('key-form').hidden")
    await page.fill("#key-input", "console-publish-key-01")
    await page.click("#key-form button[type=submit]")
    await page.wait_text("#key-error", "lacks scope 'admin'")
    # the refused key is forgotten: the next call (another page's) goes without it
    await page.js(
        "window.sent = [];"
        "const real = window.fetch;"
        "window.fetch = (url, init) => {"
        "  window.sent.push([url, (init && init.headers && init.headers.Authorization) || '']);"
        "  return real(url, init);"
        "};"
        "location.hash = 'rules';"
    )
    sent = await page.wait("return window.sent.find(([url]) => url === 'rules')")
    assert sent == ["rules", ""], sent
    await page.js("location.hash = 'live'")
    await page.fill("#key-input", key)
    await page.click("#key-form button[type=submit]")
    await _live(page)
    assert "key" not in await page.js("return location.href")
    auth = {"Authorization": f"Bearer {key}"}
    assert (await svc.post_event(_event("with-key"), **auth))[0] == 202
    await page.wait_text(ROW % "with-key", "delivered")
    # A key the service stops taking (rotated): forgotten, and the overview's refreshing,
    # which sent it again every 5 s (and, without it, a refusal row each time), stops.
    await page.js(
        "window.sent = [];"
        "const held = window.fetch;"  # the service refuses the key from now on
        "window.fetch = (url, init) => {"
        "  if (init && init.headers && init.headers.Authorization)"
        "    init.headers.Authorization = 'Bearer rotated-away-key-0001';"
        "  return held(url, init);"
        "};"
        "location.hash = 'overview';"
    )
    await page.wait("return !document.getElementById('key-form').hidden")
    assert await page.js("return sessionStorage.getItem('eventbus-key')") is None
    await page.js("window.sent = [];")
    await asyncio.sleep(6)  # past the refresh period: what is measured is that nothing happens
    assert await page.js("return window.sent") == []
    # A key held that the service now refuses for its scope (made publish-only): forgotten and
    # another asked for, after the page is opened again too (403 kept it: it was sent every
    # 5 s, and opened again the page had neither the form nor "Forget key")
    await page.js("sessionStorage.setItem('eventbus-key', 'console-publish-key-01')")
    await page.open("/console")
    await page.wait_text("#key-error", "lacks scope 'admin'")
    assert not await page.js("return document.getElementById('key-form').hidden")
    assert await page.js("return sessionStorage.getItem('eventbus-key')") is None
    assert await page.text("#page-error") == ""  # the service was reached: no other error


async def test_overview_targets_and_sources(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page], nats_url: str
) -> None:
    timer = {"name": "tick", "type": "timer", "schedule": "rate(1 minute)"}
    later = {"strategy": "fixed", "initial_delay": "1h", "max_attempts": 2, "jitter": False}
    old = {
        "name": "old",
        "type": "http",
        "url": receiver.url("/old"),
        "delivery": {"retry": later, "circuit_breaker": False},
    }
    svc = await eventbus(
        rules=RULES + "- name: to-old\n  match: {type: [gone]}\n  targets: [old]\n",
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}, old],
        sources=[timer],
        settings={"run_sources": True},
    )
    # old: one delivery waiting to retry (in an hour), then a 410 disables it
    receiver.script(503, 410)
    for i in range(2):
        assert (await svc.post_event(_event(f"old-{i}", type="gone")))[0] == 202
        await svc.drained()
    nc = await nats.connect(nats_url)
    try:  # straight onto the bus, past the edge: set aside by the router, shown on the page
        await nc.jetstream().publish(svc.service.settings.bus.nats.subject, b"not an event")
    finally:
        await nc.close()
    for i in range(3):
        assert (await svc.post_event(_event(f"ov-{i}")))[0] == 202
    await svc.drained()
    page = browser(svc.url)
    await page.open("/console#overview")
    await page.wait("return document.querySelectorAll('#charts figure').length === 7")
    await page.wait_text("#overview-ready", '"database": "ok"')
    # the page refreshes itself: once a sample after the events is in, the chart shows them
    peak = await page.wait(
        "const c = document.querySelector('figure[data-series=delivered] figcaption');"
        "const m = c && c.textContent.match(/peak ([0-9.]+)/);"
        "return m && Number(m[1]) > 0 ? Number(m[1]) : null",
        within=15,
        what="a delivery rate above 0 on the chart",
    )
    assert peak <= 6 / 5 * 1.1  # six deliveries, in one 5 s interval or split over two
    assert await page.js("return document.querySelector('figure polyline').getAttribute('points')")
    await _shot(page, "overview")
    # one delivery waiting for the function's answer: in flight (the function is stopped at
    # the end of the test, which ends the wait)
    receiver.script(Response(200, delay=60))
    assert (await svc.post_event(_event("ov-slow")))[0] == 202
    await receiver.wait_for(10)
    await eventually(
        lambda: svc.service.target_activity()["targets"]["fn"]["in_flight"] == 1, what="in flight"
    )
    await page.click("nav a[data-page=targets]")
    row = await page.wait_text("#targets-rows", "fn")
    assert "http" in row and "closed" in row
    cells = await page.js(
        "return [...document.querySelectorAll('#targets-rows tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent))"
    )
    name, kind, circuit, in_flight, rate, failed, mean, p95, delivered = cells[0][:9]
    assert (name, kind, circuit, in_flight, failed) == ("fn", "http", "closed", "1", "0"), cells
    assert float(rate) > 0 and float(mean) > 0 and float(p95) > 0, cells
    assert int(delivered) >= 7 and cells[0][11:] == ["0", ""], cells  # on: no Enable
    # old is disabled (why and since when, with Enable) and has a retry waiting
    assert cells[1][0] == "old" and cells[1][11] == "1", cells
    assert "410 Gone at attempt 1" in cells[1][12] and "Enable" in cells[1][12], cells
    assert await page.js("return document.querySelectorAll('#targets-rows button').length") == 1
    await page.click("#targets-rows button")
    await page.wait_text("#targets-message", "old enabled")
    await page.wait("return !document.querySelector('#targets-rows button')", what="no Enable")
    # a page that cannot load says why, until it can (the page refreshes itself)
    pool = svc.service.store.pool
    await pool.execute("ALTER TABLE disabled_targets RENAME TO disabled_targets_away")
    await page.click("nav a[data-page=overview]")
    await page.click("nav a[data-page=targets]")
    error = await page.wait_text("#page-error", "Could not load this page: ")
    assert "disabled_targets" in error, error
    await pool.execute("ALTER TABLE disabled_targets_away RENAME TO disabled_targets")
    await page.wait("return !document.getElementById('page-error').textContent", what="cleared")
    assert "last " in await page.text("#targets-window")
    source = await page.wait_text("#sources-rows", "tick")
    assert "timer" in source, source
    set_aside = await page.wait_text("#source-dl-rows", "not an event")
    assert "bus" in set_aside, set_aside
    await _shot(page, "targets")


async def test_a_burst_keeps_the_page_bounded_and_responsive(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    svc, page = await _on_the_live_page(eventbus, receiver, browser)
    batch = [_event(f"b-{i}") for i in range(1200)]
    for start in range(0, len(batch), 300):
        status, _, answer = await svc.request(
            "POST",
            "/events",
            orjson.dumps(batch[start : start + 300]),
            {"Content-Type": "application/cloudevents-batch+json"},
        )
        assert status == 202, answer
    await svc.drained()
    # every row drawn, each settled (its second row updated it in place): the newest 500
    await page.wait(
        "return document.querySelectorAll('#live-rows tr').length === 500"
        " && !document.querySelector('#live-rows td.state-routing')",
        within=20,
        what="500 settled rows",
    )
    started = time.monotonic()
    ids = await page.js(
        "return [...document.querySelectorAll('#live-rows tr')].map(tr => tr.dataset.id)"
    )
    assert time.monotonic() - started < 1.0  # still responsive
    assert len(set(ids)) == 500 and set(ids) <= {e["id"] for e in batch}
    assert "dropped" not in await page.text("#live-status")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_console_of_a_two_worker_serve(
    serve_process: Callable[..., ServeProcess],
    receiver: Receiver,
    browser: Callable[[str], Page],
) -> None:
    """The console as a user runs it: ``eventbus serve --workers 2``, a real process. Events
    sent on connections either worker takes all show on the one page, whichever worker serves
    it, and its figures count both workers' deliveries."""
    proc = serve_process(
        rules=RULES,
        targets=[{"name": "fn", "type": "http", "url": receiver.url("/fn")}],
        workers=2,
    )
    await proc.start()
    await eventually(
        lambda: proc.log.read_text().count("eventbus ready") == 2,
        within=60,
        what="both workers ready",
    )
    page = browser(proc.url)
    await page.open("/console")
    await _live(page)

    events = 20
    # a connection each: the kernel hands each new one to either worker
    await asyncio.gather(*(proc.publish(_event(f"w2-{i}")) for i in range(events)))
    await page.wait(
        "return [...document.querySelectorAll('#live-rows tr')]"
        ".filter(tr => tr.textContent.includes('delivered')).length === arguments[0]",
        events,
        what="every event's row, delivered",
    )
    await page.click(ROW % "w2-7")
    await page.wait_text("#trail-attempts", "delivered")
    assert "orders → fn" in await page.text("#trail-matches")
    await page.click("nav a[data-page=targets]")
    await page.wait(
        "const tr = document.querySelector('#targets-rows tr');"
        "return tr && tr.cells[8].textContent === String(arguments[0])",
        2 * events,
        what="both workers' deliveries counted (two rules per event)",
    )
    assert await proc.terminate(timeout=30) == 0


async def test_the_console_behind_a_proxy_that_serves_eventbus_under_a_path(
    eventbus: StartService, receiver: Receiver, browser: Callable[[str], Page]
) -> None:
    # The page asked for /rules, /events/live and its own script at the proxy's root, not
    # under the path the proxy gives eventbus: nothing loaded.
    svc = await _start(eventbus, receiver)
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def forward(request: web.Request) -> web.StreamResponse:
            tail = request.match_info["tail"]
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with session.request(
                request.method,
                f"{svc.url}/{tail}",
                params=request.query,
                headers=headers,
                data=await request.read(),
                allow_redirects=False,
            ) as upstream:
                answer = web.StreamResponse(status=upstream.status)
                for name, value in upstream.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        answer.headers.add(name, value)
                await answer.prepare(request)
                async for chunk in upstream.content.iter_any():  # the live stream, as it comes
                    await answer.write(chunk)
                await answer.write_eof()
                return answer

        proxy = web.Application()
        proxy.router.add_route("*", "/eb/{tail:.*}", forward)
        runner = web.AppRunner(proxy, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            page = browser(f"http://127.0.0.1:{port}/eb")
            await page.open("/")  # the service's front page sends the browser on to its console
            await _live(page)
            assert (await page.js("return location.pathname")) == "/eb/console"
            await page.open("/console/")  # a slash too many: to the page, under the path
            await _live(page)
            assert (await page.js("return location.pathname")) == "/eb/console"
            assert (await svc.post_event(_event("proxied")))[0] == 202
            await page.wait_text(ROW % "proxied", "delivered")
            assert await page.js(  # the style sheet came through the proxy too
                "return getComputedStyle(document.body).fontFamily !== ''"
                " && document.styleSheets[0].cssRules.length > 0"
            )
            await page.click("nav a[data-page=targets]")
            await page.wait_text("#targets-rows", "fn")
            await page.click("nav a[data-page=overview]")
            await page.wait_text("#overview-ready", '"database": "ok"')
            assert await page.text("#page-error") == ""
        finally:
            await runner.cleanup()
