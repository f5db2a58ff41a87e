"""The page as a place to browse a collection, in Debian's Chromium (Playwright's Python API, no browser
download): a facet click filters the results and lands in the URL (back/forward keep it), the map canvas
draws and a box or a lasso on it becomes a ``map within`` filter (no cap on the items it holds), a selection
and the whole filtered view export as CSV and JSONL, arrow keys move through the grid, and
metadata is shown as text only."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tarfile
from urllib.parse import parse_qs, urlencode, urlparse

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
T = 20_000
sync_api.expect.set_options(timeout=T)
EVIL = '<img src=x onerror="document.body.dataset.pwned=1">'
LICENSES = ["cc0", "cc-by", "it's mine"]
MAP_WITHIN = re.compile(r"^map within \((-?[\d.]+ -?[\d.]+, ){2,63}-?[\d.]+ -?[\d.]+\)$")
BIG, DIM = 1500, 16


@pytest.fixture(scope="module")
def site(tmp_path_factory, embedded, samples):
    from mmretrieve.ingest import build_index

    root = tmp_path_factory.mktemp("collection")
    manifest = root / "photos.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "id", "caption", "year", "license", "note"])
        for i, s in enumerate(samples):
            w.writerow([s.path, s.id, s.caption, 2010 + i % 5, LICENSES[i % 3], EVIL if i == 0 else f"note {i}"])
    build_index("photos", manifest, encoder=embedded, index_dir=root / "indexes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMRETRIEVE_CACHE", str(root / "cache"))  # the map's cache file
        svc = Service(ServeConfig(indexes=["photos"], index_dir=str(root / "indexes"), reload_interval_s=0),
                      encoders={"embedded": embedded}).start()
        try:
            with running_server(create_app(svc)) as base:
                yield base, svc
        finally:
            svc.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """An index of BIG items written as vectors (no encoder): four clusters, a metadata field."""
    import numpy as np

    from mmretrieve.store import IndexWriter, Item

    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BIG, DIM)).astype(np.float32) * 0.3
    x[:, 0] += np.arange(BIG) % 4 * 3
    x[:, 1] += np.arange(BIG) % 2 * 2
    info = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}
    with IndexWriter(root / "indexes" / "big", encoder_info=info, create=True, auto_compact=False) as w:
        w.add([Item(id=-1, key=f"k{i}", uri=f"vec://{i}", caption=f"thing {i}", extra={"group": f"g{i % 4}"})
               for i in range(BIG)], x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMRETRIEVE_CACHE", str(root / "cache"))
        svc = Service(ServeConfig(indexes=["big"], index_dir=str(root / "indexes"), reload_interval_s=0)).start()
        try:
            with running_server(create_app(svc)) as base:
                yield base, svc
        finally:
            svc.close()


def _drag(pg, points, lasso=False):
    """Drag through ``points`` (fractions of the map canvas), in box or lasso mode."""
    mode = pg.locator("#map-mode")
    if (mode.get_attribute("aria-pressed") == "true") != lasso:
        mode.click()
    box = pg.locator("#map").bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    pg.mouse.move(*at[0])
    pg.mouse.down()
    for p in at[1:]:
        pg.mouse.move(*p, steps=8)
    pg.mouse.up()


def test_a_box_of_more_than_300_and_a_lasso_filter_without_a_cap(big, page):
    expect = sync_api.expect
    base, svc = big
    pg = page
    idx = svc.manager.get("big").index
    pg.goto(base + "/?index=big&k=24")
    expect(pg.locator("body")).to_have_attribute("data-ready", "1")
    expect(pg.locator("#map-info")).to_contain_text(f"{BIG} items · pca")
    _drag(pg, [(0.01, 0.01), (0.5, 0.6), (0.99, 0.99)])  # a box around (nearly) everything
    expect(pg.locator("#filter")).to_have_value(MAP_WITHIN)
    boxed = idx.select(_filter(pg)).count
    assert boxed > 300
    expect(pg.locator("#facets-info")).to_have_text(f"{boxed} matching")
    expect(pg.locator("#status")).to_contain_text(f"browsing {boxed} matching")
    pg.locator("#filter-clear").click()
    expect(pg.locator("#filter")).to_have_value("")
    # a freehand lasso: a concave path around part of the map
    _drag(pg, [(0.05, 0.05), (0.6, 0.1), (0.3, 0.4), (0.6, 0.9), (0.05, 0.95)], lasso=True)
    expect(pg.locator("#filter")).to_have_value(MAP_WITHIN)
    lassoed = idx.select(_filter(pg))
    assert len(_filter(pg).split(",")) > 4 and 0 < lassoed.count < BIG
    expect(pg.locator("#facets-info")).to_have_text(f"{lassoed.count} matching")
    expect(pg.locator("#col-0 .hit")).to_have_count(min(24, lassoed.count))
    shown = [int(x) for x in pg.locator("#col-0 .hit").evaluate_all("bs => bs.map((b) => b.dataset.id)")]
    assert set(shown) <= set(lassoed.ids.tolist())
    # the whole filtered view downloads, not only the hits shown
    with pg.expect_download() as d:
        pg.locator("#export-view-jsonl").click()
    rows = [json.loads(x) for x in open(d.value.path(), encoding="utf-8").read().splitlines()]
    assert sorted(r["id"] for r in rows) == lassoed.ids.tolist() and all("group" in r for r in rows)
    with pg.expect_download() as d:
        pg.locator("#export-view-csv").click()
    got = list(csv.DictReader(open(d.value.path(), encoding="utf-8")))
    assert sorted(int(r["id"]) for r in got) == lassoed.ids.tolist()
    expect(pg.locator("#status")).to_have_text(f"Exported {lassoed.count} items.")
    assert not pg.errors, pg.errors


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("dialog", lambda d: (pg.errors.append("dialog: " + d.message), d.dismiss()))
    pg.set_default_timeout(T)
    yield pg
    ctx.close()


def _filter(pg) -> str:
    return parse_qs(urlparse(pg.url).query).get("filter", [""])[0]


def test_a_facet_click_filters_and_the_filter_lives_in_the_url(site, page):
    expect = sync_api.expect
    base, _ = site
    pg = page
    pg.goto(base + "/?index=photos&q=a+photo&k=48&show=license,note")
    expect(pg.locator("body")).to_have_attribute("data-ready", "1")
    expect(pg.locator("#col-0 .hit").first).to_be_visible()
    everything = pg.locator("#col-0 .hit").count()
    lic = pg.locator('#facets details[data-field="license"] .facet-value[data-value="it\'s mine"]')
    expect(lic).to_be_visible()
    expected = int(lic.locator(".n").inner_text())
    lic.click()
    expect(pg.locator("#col-0 .hit")).to_have_count(expected)
    assert expected < everything
    assert _filter(pg) == "license = 'it''s mine'"
    expect(pg.locator("#filter")).to_have_value("license = 'it''s mine'")
    for dd in pg.locator("#col-0 .hit-meta dd").all_inner_texts()[::2]:
        assert dd == "it's mine"
    # the facets now count within the filter; a range from a numeric field narrows further
    expect(pg.locator("#facets-info")).to_have_text(f"{expected} matching")
    year = pg.locator('#facets details[data-field="year"]')
    year.locator('input[aria-label="year from"]').fill("2012")
    year.locator("button", has_text="Apply").click()
    expect(pg.locator("#filter")).to_have_value("(license = 'it''s mine') and year >= 2012 and year <= 2014")
    expect(pg.locator("#facets-info")).not_to_have_text(f"{expected} matching")
    narrowed = int(pg.locator("#facets-info").inner_text().split()[0])
    assert 0 < narrowed < expected
    expect(pg.locator("#col-0 .hit")).to_have_count(narrowed)  # k=48: every match is shown
    # back and forward keep the filter; a reload too
    pg.go_back()
    expect(pg.locator("#filter")).to_have_value("license = 'it''s mine'")
    expect(pg.locator("#col-0 .hit")).to_have_count(expected)
    pg.go_forward()
    expect(pg.locator("#filter")).to_have_value("(license = 'it''s mine') and year >= 2012 and year <= 2014")
    pg.reload()
    expect(pg.locator("body")).to_have_attribute("data-ready", "1")
    expect(pg.locator("#col-0 .hit")).to_have_count(narrowed)
    assert not pg.errors, pg.errors


def test_the_map_draws_and_a_box_filters(site, page):
    expect = sync_api.expect
    base, svc = site
    pg = page
    pg.goto(base + "/?index=photos&q=a+photo&k=48")
    expect(pg.locator("body")).to_have_attribute("data-ready", "1")
    expect(pg.locator("#map-info")).to_contain_text("items · pca")
    expect(pg.locator("#col-0 .hit").first).to_be_visible()
    inked = pg.evaluate("""() => { const c = document.getElementById('map'), d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) n++; return n; }""")
    assert inked > 50, inked
    box = pg.locator("#map").bounding_box()
    pg.mouse.move(box["x"] + 2, box["y"] + 2)
    pg.mouse.down()
    pg.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=4)
    pg.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2, steps=4)
    pg.mouse.up()
    expect(pg.locator("#filter")).to_have_value(MAP_WITHIN)
    assert len(_filter(pg).split(",")) == 4  # a box: four vertices
    want = svc.manager.get("photos").index.select(_filter(pg)).ids.tolist()
    live = len(svc.manager.get("photos").index)
    assert 0 < len(want) < live
    expect(pg.locator("#col-0 .hit")).to_have_count(len(want))
    shown = {int(b.get_attribute("data-id")) for b in pg.locator("#col-0 .hit").all()}
    assert shown == set(want)
    assert not pg.errors, pg.errors


def test_selection_exports_and_arrow_keys_and_metadata_as_text(site, page):
    expect = sync_api.expect
    base, _ = site
    pg = page
    pg.goto(base + "/?index=photos&q=a+photo&k=12&show=note")
    expect(pg.locator("body")).to_have_attribute("data-ready", "1")
    hits = pg.locator("#col-0 .hit")
    expect(hits.first).to_be_visible()
    # arrow keys move through the grid
    hits.nth(0).focus()
    pg.keyboard.press("ArrowRight")
    expect(hits.nth(1)).to_be_focused()
    pg.keyboard.press("ArrowLeft")
    expect(hits.nth(0)).to_be_focused()
    pg.keyboard.press("ArrowDown")
    top = "b => b.getBoundingClientRect().top"
    assert pg.evaluate(f"() => ({top})(document.activeElement)") > hits.nth(0).evaluate(top) + 20
    pg.keyboard.press("ArrowUp")
    expect(hits.nth(0)).to_be_focused()
    # click selects one, shift-click a range
    pg.locator("#col-0 .sel").nth(1).click()
    hits.nth(3).click(modifiers=["Shift"])
    expect(pg.locator("#sel-count")).to_have_text("3 selected")
    expect(pg.locator("#detail")).to_be_hidden()
    keys = [hits.nth(i).get_attribute("data-key") for i in (1, 2, 3)]
    with pg.expect_download() as d:
        pg.locator("#export-csv").click()
    rows = list(csv.DictReader(open(d.value.path(), encoding="utf-8")))
    assert [r["key"] for r in rows] == keys and {"year", "license", "note"} <= set(rows[0])
    with pg.expect_download() as d:
        pg.locator("#export-jsonl").click()
    lines = [json.loads(x) for x in open(d.value.path(), encoding="utf-8").read().splitlines()]
    assert [x["key"] for x in lines] == keys and all("license" in x["metadata"] for x in lines)
    # the whole view as a webdataset tar: each item's file bytes and its row, as binary (not text-decoded)
    with pg.expect_download() as d:
        pg.locator("#export-view-wds").click()
    assert d.value.suggested_filename == "photos-all.tar"
    with tarfile.open(d.value.path()) as t:
        names = t.getnames()
        first = next(n for n in names if not n.endswith(".json"))
        data = t.extractfile(first).read()
    idx = site[1].manager.get("photos").index
    assert len(names) == 2 * len(idx) and data[:3] in (b"\xff\xd8\xff", b"\x89PN")  # a JPEG or PNG, byte for byte
    # the value with markup is text, on the card and in the detail view
    evil_filter = "note = '" + EVIL.replace("'", "''") + "'"
    pg.goto(base + "/?" + urlencode({"index": "photos", "q": "a photo", "k": 48, "show": "note", "filter": evil_filter}))
    expect(pg.locator("#col-0 .hit")).to_have_count(1)
    expect(pg.locator("#col-0 .hit-meta dd")).to_have_text(EVIL)
    hits.first.click()
    expect(pg.locator("#d-meta")).to_contain_text(EVIL)
    assert pg.evaluate("() => document.querySelectorAll(\"img[src='x']\").length") == 0
    assert pg.evaluate("() => document.body.dataset.pwned === undefined")
    assert not pg.errors, pg.errors


def test_a_facet_click_without_a_query_browses_the_matching_items(site, page):
    expect = sync_api.expect
    base, svc = site
    pg = page
    pg.goto(base + "/?index=photos&k=48")
    expect(pg.locator("body")).to_have_attribute("data-ready", "1")
    lic = pg.locator('#facets details[data-field="license"] .facet-value[data-value="cc0"]')
    expect(lic).to_be_visible()
    expect(pg.locator("#col-0 .hit")).to_have_count(0)
    lic.click()
    want = svc.manager.get("photos").index.select("license = 'cc0'").ids.tolist()
    expect(pg.locator("#col-0 .hit")).to_have_count(len(want))
    assert [int(x) for x in pg.locator("#col-0 .hit").evaluate_all("bs => bs.map((b) => b.dataset.id)")] == want
    assert _filter(pg) == "license = 'cc0'" and "q" not in parse_qs(urlparse(pg.url).query)
    expect(pg.locator("#status")).to_contain_text(f"browsing {len(want)} matching")
    expect(pg.locator("#col-0 .hit .score")).to_have_count(0)  # no query: no scores
    assert not pg.errors, pg.errors
