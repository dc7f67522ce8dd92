"""End to end in headless Chromium (Debian ``chromium``, driven by Playwright):
open the page, pick a case, generate, rank, record a second opinion, run one DPO
update, and check that the charts show a new point and that a trace containing
``<script>`` stays inert; then the Data tab (workspaces, the two annotators'
agreement, a download), the Evaluate tab (a small held-out A/B run), and a second update
after which the KL chart's probe line equals KL recomputed on the probe set.

The app runs in this process on tiny-random with the scripted backend (see
``ui_scenario``), so the update is real. Install the browser with
``make browser`` (``make test`` does it). Without ``/usr/bin/chromium`` the test
fails when ``CI`` is set and is skipped otherwise. ``UI_SCREENSHOT_DIR`` keeps
a screenshot of the page after the loop.
"""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest

import ui_scenario as sc

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 120_000
ANNOTATOR = "Dr <i>Browser</i><img src=x onerror=window.__pwned=3>"


def _missing(reason: str):
    message = f"{reason}. Install it with `make browser` (apt-get install chromium chromium-driver)."
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        _missing(f"Chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package is not installed (requirements-dev.txt)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the page's address, its control room): the app serves in this process."""
    from app import build_app, launch

    root = tmp_path_factory.mktemp("browser")
    demo = build_app("tiny-random", cases_dir=sc.write_cases(root / "cases"), generate_fn=sc.backend(delay=0.03),
                     checkpoint_dir=root / "checkpoints", db_path=root / "rlhf.sqlite", checkpoint_every=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", demo.room
    demo.close()


@pytest.fixture(scope="module")
def app_url(served):
    return served[0]


def _screenshot(page, name: str) -> None:
    """With ``UI_SCREENSHOT_DIR`` set, keep a full-page screenshot."""
    shots = os.environ.get("UI_SCREENSHOT_DIR")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / name), full_page=True)


def _radio_labels(page) -> list[str]:
    return [t.strip() for t in page.locator("#ranking-list label span").all_inner_texts()]


def _select_and_move(page, trace: str, button: str, times: int = 1) -> None:
    for _ in range(times):
        before = [_radio_labels(page), page.inner_text("#rank-message .cr-status")]
        page.locator("#ranking-list label", has_text=trace).click()
        page.click(button)
        page.wait_for_function(  # the order or the message changed: the server answered
            "([labels, message]) => JSON.stringify(Array.from(document.querySelectorAll('#ranking-list label span'))"
            ".map(e => e.innerText.trim())) !== JSON.stringify(labels)"
            " || document.querySelector('#rank-message .cr-status').innerText !== message",
            arg=before, timeout=TIMEOUT_MS)


def test_generate_rank_update_in_the_browser(browser, app_url, served):
    from playwright.sync_api import expect

    from rlhf_core.belief import probe_kl

    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page_errors: list[str] = []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    page.goto(app_url)

    # pick a case
    page.click("#case-picker input")
    page.locator("ul[role=listbox] li", has_text=sc.CASE.id).first.click()
    expect(page.locator("#vignette textarea")).to_have_value(re.compile("sore throat"), timeout=TIMEOUT_MS)
    # what the model believes about it: reference and policy bars, the same at v0
    belief_js = ("() => { const p = document.querySelector('#belief-chart .js-plotly-plot');"
                 " return p && p.data && p.data.length === 2 ? JSON.stringify(p.data.map(d => Array.from(d.x))) : null; }")
    page.wait_for_function(belief_js, timeout=TIMEOUT_MS)
    belief_before = page.evaluate(belief_js)

    # generate: the cards stream, then show the verdicts
    started = time.perf_counter()
    page.click("#generate-button")
    expect(page.locator("#trace-card-0")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#generate-progress")).to_contain_text("Done", timeout=TIMEOUT_MS)
    generate_seconds = time.perf_counter() - started
    # while the clinician reads, the reference pass their update will need runs and is stored
    store, workspace = served[1].engine.store, served[1].workspace
    drawn = [t.trace_id for t in store.traces(workspace, light=True)]
    deadline = time.perf_counter() + TIMEOUT_MS / 1000
    while len(store.trace_references(workspace, drawn)) < 4 and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert len(store.trace_references(workspace, drawn)) >= 4  # the 4 rankable traces, and those below the line
    for i in range(4):
        expect(page.locator(f"#trace-card-{i}")).to_be_visible()
    expect(page.locator("#trace-card-4")).to_be_hidden()
    # the cards stand in ranking order: the hard-safety trace C starts at the bottom
    expect(page.locator("#trace-card-3")).to_contain_text("hard violation")
    expect(page.locator("#trace-card-3")).to_contain_text("Trace C")

    # the <script> trace is shown as text and never runs
    script_text = page.locator("#trace-text-1 textarea")
    expect(script_text).to_be_visible()
    expect(script_text).to_have_value(re.compile(re.escape("<script>window.__pwned=1</script>")))
    # the distractor trace waits below the line, under every rankable one; its duplicates are elsewhere
    expect(page.locator("#below-the-line")).to_contain_text("Below the line")
    expect(page.locator("#below-the-line")).to_contain_text("infectious mononucleosis")
    page.get_by_text("Other rejected traces (3)").click()
    rejected = page.locator("#rejected-html details", has=page.locator("pre", has_text="<script>window.__pwned=1</script>")).first
    rejected.locator("summary").click()
    expect(rejected.locator("pre")).to_be_visible()  # the literal markup is shown as text
    assert page.evaluate("typeof window.__pwned") == "undefined"

    # rank: the hard-safety trace (C) cannot be moved to first place; put D first
    assert [label.split(" — ")[0] for label in _radio_labels(page)] == ["1. Trace A", "2. Trace B", "3. Trace D", "4. Trace C"]
    tails = [label.split(" — ", 1)[1] for label in _radio_labels(page)]
    assert len(set(tails)) == 4 and all(" words" in t for t in tails)  # each entry tells its trace apart
    _select_and_move(page, "Trace C", "#rank-up", times=3)
    expect(page.locator("#rank-message")).to_contain_text("cannot be placed first")
    assert _radio_labels(page)[0].startswith("1. Trace A") and _radio_labels(page)[1].startswith("2. Trace C")
    _select_and_move(page, "Trace D", "#rank-up", times=3)
    assert [label.split(" — ")[0] for label in _radio_labels(page)] == ["1. Trace D", "2. Trace A", "3. Trace C", "4. Trace B"]
    # the cards moved with the ranking: D's card is first now, B's last
    expect(page.locator("#trace-card-0")).to_contain_text("#1")
    expect(page.locator("#trace-card-0")).to_contain_text("Trace D")
    expect(page.locator("#trace-card-3")).to_contain_text("Trace B")
    # a comment travels with its card
    comment = "#trace-comment-{} textarea, #trace-comment-{} input"
    page.locator(comment.format(0, 0)).first.fill("concise and safe")  # on D
    _select_and_move(page, "Trace D", "#rank-down", times=1)
    expect(page.locator("#trace-card-1")).to_contain_text("Trace D")
    expect(page.locator(comment.format(1, 1)).first).to_have_value("concise and safe")
    expect(page.locator(comment.format(0, 0)).first).to_have_value("")
    _select_and_move(page, "Trace D", "#rank-up", times=1)
    expect(page.locator(comment.format(0, 0)).first).to_have_value("concise and safe")

    # a second opinion: another clinician records the same order without training
    annotator = page.locator("#annotator textarea, #annotator input").first
    annotator.fill("Dr Second")
    page.click("#record-button")
    expect(page.locator("#update-status")).to_contain_text("Ranking by Dr Second recorded", timeout=TIMEOUT_MS)
    expect(page.locator("#header")).to_contain_text("policy v0")

    # name once, a comment, and one DPO update
    annotator.fill(ANNOTATOR)
    page.locator(comment.format(0, 0)).first.fill("concise and safe")  # on D
    started = time.perf_counter()
    page.click("#update-button")
    expect(page.locator("#update-status")).to_contain_text("v0 → v1", timeout=TIMEOUT_MS)
    update_seconds = time.perf_counter() - started

    # the charts show the new point (policy version 1), and the header the new version
    page.wait_for_function(
        "() => { const p = document.querySelector('#chart-loss .js-plotly-plot');"
        " return p && p.data && p.data.some(d => d.mode === 'lines+markers' && Array.from(d.x).includes(1)); }",
        timeout=TIMEOUT_MS)
    for chart in ("kl", "rewards", "accuracy"):
        page.wait_for_function(
            f"() => {{ const p = document.querySelector('#chart-{chart} .js-plotly-plot');"
            " return p && p.data && p.data.some(d => Array.from(d.x).includes(1)); }", timeout=TIMEOUT_MS)
    expect(page.locator("#header")).to_contain_text("policy v1")
    # every ranked card says what the update did to its trace
    for i in range(4):
        expect(page.locator(f"#trace-card-{i}")).to_contain_text(re.compile(r"now [\d.e+-]+× as likely \([+-]\d\.\d{4} nats/token\)"))
    # the belief chart refreshed: the policy's bars moved away from the reference's
    page.wait_for_function(f"() => {{ const now = ({belief_js})(); return now && now !== {belief_before!r}; }}",
                           timeout=TIMEOUT_MS)
    expect(page.locator("#belief-chart")).to_contain_text("policy now (v1)")
    expect(page.locator("#updates-table")).to_contain_text(ANNOTATOR)  # user text is shown as text too
    assert page.evaluate("typeof window.__pwned") == "undefined"
    _screenshot(page, "control_room.png")

    # the Data tab: the workspace, the two annotators' agreement, and a download that serves the file
    page.get_by_role("tab", name="Data").click()
    expect(page.locator("#workspace-table")).to_contain_text("default", timeout=TIMEOUT_MS)
    expect(page.locator("#agreement-table")).to_contain_text("Dr Second", timeout=TIMEOUT_MS)
    expect(page.locator("#agreement-summary")).to_contain_text("mean Kendall's tau +1.000")
    page.click("#export-trl")
    # two rankings of 4 traces above 1 below the line: C(4,2) + 4 = 10 pairs each
    expect(page.locator("#export-status")).to_contain_text("20 row(s) from workspace default", timeout=TIMEOUT_MS)
    link = page.locator("#export-file a").first
    expect(link).to_be_visible(timeout=TIMEOUT_MS)
    download = page.request.get(link.get_attribute("href") if link.get_attribute("href").startswith("http")
                                else app_url.rstrip("/") + link.get_attribute("href"))
    assert download.ok and download.text().count("\n") == 20 and '"chosen"' in download.text()
    _screenshot(page, "data.png")

    # the Evaluate tab: a small A/B run in the engine queue fills the table
    page.get_by_role("tab", name="Evaluate").click()
    samples = page.locator("#eval-samples input[type=number]")
    samples.fill("1")
    samples.press("Enter")
    tokens = page.locator("#eval-max-tokens input[type=number]")
    tokens.fill("16")
    tokens.press("Enter")
    started = time.perf_counter()
    page.click("#eval-run")
    expect(page.locator("#eval-table")).to_contain_text("policy − reference", timeout=TIMEOUT_MS)
    expect(page.locator("#eval-summary")).to_contain_text("1 sample(s) per arm")
    eval_seconds = time.perf_counter() - started
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert not page_errors, page_errors

    _screenshot(page, "evaluate.png")

    # a second update: the KL chart's line for the probe's fixed traces, at v2, equals KL recomputed now
    page.get_by_role("tab", name="Control room").click()
    page.click("#generate-button")
    expect(page.locator("#generate-progress")).to_contain_text("Done", timeout=TIMEOUT_MS)
    page.click("#update-button")
    expect(page.locator("#update-status")).to_contain_text("v1 → v2", timeout=TIMEOUT_MS)
    kl_js = ("() => { const p = document.querySelector('#chart-kl .js-plotly-plot'); if (!p || !p.data) return null;"
             " const d = p.data.find(d => d.name === 'on the taught probe traces (fixed)'); if (!d) return null;"
             " const i = Array.from(d.x).indexOf(2); return i < 0 ? null : d.y[i]; }")
    page.wait_for_function(kl_js, timeout=TIMEOUT_MS)
    room = served[1]
    with room.lock:
        recomputed = probe_kl(room.engine.lm, list(room.engine.probe.completions.values()))
    assert recomputed > 0 and page.evaluate(kl_js) == pytest.approx(recomputed, rel=1e-6)
    print(f"\nbrowser timings on tiny-random (scripted backend): generate {generate_seconds:.1f}s, "
          f"update {update_seconds:.1f}s, A/B {eval_seconds:.1f}s")
    page.close()
