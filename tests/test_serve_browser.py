"""The web page in a real browser: Debian's Chromium driven by Playwright's Python API (no browser
download), against a server on a free loopback port. Skips, saying why, when Chromium or Playwright
is missing; `.ci/run` installs Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mmretrieve[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)

from serve_helpers import running_server  # noqa: E402

from mmretrieve.serve import ServeConfig, Service, create_app  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
T = 20_000  # ms per wait

DROP = """([b64, name]) => {
    const bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, { type: "image/png" }));
    return dt;
}"""


@pytest.fixture()
def site(serve_gallery, embedded):
    svc = Service(ServeConfig(indexes=["gallery"], index_dir=str(serve_gallery), reload_interval_s=0),
                  encoders={"embedded": embedded}).start()
    try:
        with running_server(create_app(svc)) as base:
            yield base
    finally:
        svc.close()


@pytest.fixture()
def page(site):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            pg.requested, pg.errors = [], []
            pg.on("request", lambda r: pg.requested.append(r.url))
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            pg.set_default_timeout(T)
            yield pg
        finally:
            browser.close()


def first_key(pg, col: int = 0) -> str:
    return pg.locator(f"#col-{col} .hit").first.get_attribute("data-key")


def test_search_compose_and_click_through_in_chromium(site, page, sample_by_id, tmp_path):
    expect = sync_api.expect
    pg = page
    pg.goto(site + "/")
    expect(pg.locator("body")).to_have_attribute("data-ready", "1")

    # a text query, typed and sent with Enter
    pg.locator("#q").fill("a photo of a cat")
    pg.locator("#q").press("Enter")
    expect(pg.locator("#col-0 .hit").first).to_have_attribute("data-key", "chelsea")
    expect(pg.locator("#status")).to_contain_text("text")
    assert "q=a+photo+of+a+cat" in pg.url

    # drop an image, add a modification text: a composed query, two fusions side by side, re-ranked by EMD
    png = Path(sample_by_id["motorcycle_left"].path).read_bytes()
    dt = pg.evaluate_handle(DROP, [base64.b64encode(png).decode(), "motorcycle.png"])
    pg.dispatch_event("#drop", "drop", {"dataTransfer": dt})
    expect(pg.locator("#reference")).to_be_visible()
    expect(pg.locator("#ref-label")).to_have_text("motorcycle.png")
    pg.locator("#compare").check()
    pg.locator("#rerank").select_option("emd")
    pg.locator("#q").fill("a horse")
    pg.locator("#q").press("Enter")
    expect(pg.locator("#status")).to_contain_text("composed (sum vs intersection)")
    expect(pg.locator("#col-1")).to_be_visible()
    expect(pg.locator("#col-0 .col-title")).to_have_text("fusion: sum · coarse → emd")
    expect(pg.locator("#col-1 .col-title")).to_have_text("fusion: intersection · coarse → emd")
    stages = pg.locator("#col-0 .hit .stages").first.inner_text()
    assert re.fullmatch(r"#coarse \d+ → #emd 1", stages), stages
    shown = [float(t.split()[-1]) for t in pg.locator("#col-0 .hit .score").all_inner_texts()]
    assert len(shown) > 1 and all(a >= b for a, b in zip(shown, shown[1:])), shown  # scores fall with rank
    assert pg.locator("#col-1 .hit").count() > 0
    shot = tmp_path / "composed.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("MMRETRIEVE_TEST_ARTIFACTS"):
        shutil.copyfile(shot, Path(os.environ["MMRETRIEVE_TEST_ARTIFACTS"]) / "serve-page.png")

    # click a hit, then "search by this" (more like this: the item itself is left out); the query is in the URL
    hit = pg.locator("#col-0 .hit").nth(2)
    key = hit.get_attribute("data-key")
    hit.click()
    expect(pg.locator("#detail")).to_be_visible()
    pg.locator("#d-search").click()
    expect(pg.locator("#col-1")).to_be_hidden()
    expect(pg).to_have_url(re.compile(r"[?&]item=\d+"))
    item = re.search(r"[?&]item=(\d+)", pg.url).group(1)
    assert "q=" not in pg.url

    # the URL alone reproduces the search (loaded twice, fresh: no earlier results on the page)
    pg.goto(site + f"/?index=gallery&item={item}")
    expect(pg.locator("#col-0 .hit").first).to_be_visible()
    expect(pg.locator(f'#col-0 .hit[data-key="{key}"]')).to_have_count(0)
    first = pg.locator("#col-0 .hit").first.get_attribute("data-key")
    pg.goto(site + f"/?index=gallery&item={item}")
    expect(pg.locator("#col-0 .hit").first).to_have_attribute("data-key", first)
    expect(pg.locator("#reference")).to_be_visible()

    # keyboard: "/" focuses the query box; a video hit plays from its best moment; Escape closes
    pg.locator("#ref-clear").click()
    pg.locator("body").press("/")
    expect(pg.locator("#q")).to_be_focused()
    pg.keyboard.type("a taxi")
    pg.locator("#rerank").select_option("frames")
    pg.locator("#q").press("Enter")
    bikes = pg.locator("#col-0 .hit[data-key='bikes']")
    expect(bikes.locator(".badge")).to_contain_text(" s")
    moment = float(re.search(r"([\d.]+) s", bikes.locator(".badge").inner_text()).group(1))
    bikes.focus()
    pg.keyboard.press("Enter")
    video = pg.locator("#d-media video")
    expect(video).to_be_visible()
    t = video.evaluate("v => new Promise(r => v.readyState >= 1 ? r(v.currentTime) : "
                       "v.addEventListener('loadedmetadata', () => setTimeout(() => r(v.currentTime), 50)))")
    assert abs(t - moment) < 0.6, (t, moment)
    pg.keyboard.press("Escape")
    expect(pg.locator("#detail")).to_be_hidden()
    expect(bikes).to_be_focused()

    # "Use as reference": focus goes to the (cleared, selected) query box, not back to the card, so typing
    # the modification does not re-open the dialog, and the old text ("a taxi") does not become it
    pg.keyboard.press("Enter")
    expect(pg.locator("#detail")).to_be_visible()
    pg.locator("#d-ref").click()
    expect(pg.locator("#detail")).to_be_hidden()
    expect(pg.locator("#q")).to_be_focused()
    expect(pg.locator("#q")).to_have_value("")
    expect(pg.locator("#reference")).to_be_visible()
    pg.keyboard.type("in the rain")
    expect(pg.locator("#q")).to_have_value("in the rain")
    expect(pg.locator("#detail")).to_be_hidden()
    pg.locator("#ref-clear").click()

    # readable on a narrow window: nothing wider than the screen, the two fusions stacked
    pg.set_viewport_size({"width": 400, "height": 800})
    assert pg.evaluate("() => document.documentElement.scrollWidth") <= 400

    assert not pg.errors, pg.errors
    off_site = [u for u in pg.requested if not (u.startswith(site) or u.startswith(("data:", "blob:")))]
    assert not off_site, off_site


def test_the_token_lives_in_an_httponly_cookie_script_cannot_read(serve_gallery, embedded):
    """A server with a token: the page asks for it once, the server sets it as an HttpOnly SameSite=Strict
    cookie, and neither `document.cookie` nor storage ever holds it."""
    token = "a-browser-test-token-24ch"
    svc = Service(ServeConfig(indexes=["gallery"], index_dir=str(serve_gallery), reload_interval_s=0, token=token),
                  encoders={"embedded": embedded}).start()
    expect = sync_api.expect
    try:
        with running_server(create_app(svc)) as base, sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
            try:
                ctx = browser.new_context()
                pg = ctx.new_page()
                pg.set_default_timeout(T)
                pg.goto(base + "/")
                expect(pg.locator("body")).to_have_attribute("data-ready", "1")
                expect(pg.locator("#token-form")).to_be_visible()
                pg.locator("#token").fill(token)
                pg.locator("#token").press("Enter")
                expect(pg.locator("#token-form")).to_be_hidden()
                expect(pg.locator("body")).to_have_attribute("data-ready", "1")  # the indexes are loaded now
                expect(pg.locator("#index")).to_have_value("gallery")
                pg.locator("#q").fill("a photo of a cat")
                pg.locator("#q").press("Enter")
                expect(pg.locator("#col-0 .hit").first).to_have_attribute("data-key", "chelsea")
                assert token not in pg.evaluate("() => document.cookie")
                assert token not in pg.evaluate("() => JSON.stringify(Object.assign({}, sessionStorage, localStorage))")
                jar = [c for c in ctx.cookies() if c["name"] == "mmretrieve_token"]
                assert jar and jar[0]["httpOnly"] and jar[0]["sameSite"] == "Strict"
            finally:
                browser.close()
    finally:
        svc.close()


def test_a_generative_preset_shows_its_description_cost_and_reasoning_as_text(serve_gallery, embedded, tmp_path,
                                                                               monkeypatch):
    """The cotrr preset on a tiny local model: "searched for: ...", each generative stage's cost line, the
    reasoning (collapsed) and the per-stage ranks. The description and reasoning are model output: markup in
    them is shown as text, never run."""
    from transformers.utils import logging as hf_logging

    from mmretrieve.rerank.describe import Describer
    from mmretrieve.rerank.generate import Cost
    from mmretrieve.rerank.listwise import ListwiseReranker
    from mmretrieve.testing import write_tiny_vlm

    hf_logging.set_verbosity_error()
    evil = '<img src=x onerror="document.body.dataset.pwned=1"> a dog'
    monkeypatch.setenv("MMRETRIEVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Describer, "describe", lambda self, queries: ([evil] * len(queries), Cost(prompts=len(queries))))
    real_order = ListwiseReranker.order

    def order(self, query, qimg, ids, pictures, cost, info):
        out = real_order(self, query, qimg, ids, pictures, cost, info)
        info["reasoning"] = ['<img src=x onerror="document.body.dataset.pwned=2"> the first one has a dog']
        return out

    monkeypatch.setattr(ListwiseReranker, "order", order)
    model = write_tiny_vlm(tmp_path / "vlm", "qwen2_vl")
    svc = Service(ServeConfig(indexes=["gallery"], index_dir=str(serve_gallery), reload_interval_s=0, vlm=model,
                              request_timeout_s=120), encoders={"embedded": embedded}).start()
    expect = sync_api.expect
    try:
        item = svc.manager.get("gallery").index.get("key:chelsea").id
        with running_server(create_app(svc)) as base, sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
            try:
                pg = browser.new_page(viewport={"width": 1280, "height": 900})
                pg.set_default_timeout(60_000)
                errors = []
                pg.on("pageerror", lambda e: errors.append(str(e)))
                pg.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
                pg.goto(base + "/")
                expect(pg.locator("body")).to_have_attribute("data-ready", "1")
                assert pg.locator('#rerank option[value="preset:cotrr"]').is_enabled()
                pg.goto(f"{base}/?index=gallery&q=a+dog+instead&item={item}&rerank=preset%3Acotrr&k=12")
                expect(pg.locator("#col-0 .gen-info .described")).to_be_visible()
                expect(pg.locator("#col-0 .gen-info .described")).to_have_text("searched for: " + evil)
                expect(pg.locator("#col-0 .gen-info .costs")).to_contain_text("listwise (")
                expect(pg.locator("#col-0 .gen-info .costs")).to_contain_text("describe: 1 prompt(s)")
                box = pg.locator("#col-0 .gen-info details.reasoning")
                expect(box).to_have_count(1)
                assert box.get_attribute("open") is None  # collapsed
                box.locator("summary").click()
                expect(box.locator("li").first).to_contain_text("<img src=x")
                assert pg.evaluate('() => document.querySelectorAll("img[src=\'x\']").length') == 0
                assert pg.evaluate("() => document.body.dataset.pwned === undefined")
                stages = pg.locator("#col-0 .hit .stages").first.inner_text()
                assert re.fullmatch(r"#coarse \d+ → #listwise \d+", stages), stages
                assert not errors, errors
            finally:
                browser.close()
    finally:
        svc.close()
