"""`ckptdb ui` in headless Chromium (Debian's package, driven by Playwright): runs -> run -> checkpoint
-> SQL on a catalog made by real training runs, chart points and table rows checked against the
catalog, a new checkpoint appearing on an open page, screenshots kept under the test's tmp dir.

Skipped only when no Chromium is installed (`apt-get install -y chromium`; .ci/run does it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ckptdb.analysis import metric_curve, readonly_query
from ckptdb.catalog import Catalog
from ckptdb.retention import KeepLast
from tests.ui.conftest import UiServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install -y chromium)")
sync_api = pytest.importorskip("playwright.sync_api")


def shot(page: object, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    copy_to = os.environ.get("CKPTDB_UI_SCREENSHOTS")  # to refresh docs/ui.png
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(copy_to) / path.name)


def test_click_through(ui_server: UiServer, tmp_path: Path) -> None:
    s = ui_server
    art = tmp_path / "screenshots"
    art.mkdir()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            # runs page: one row per run, counts as run_summary says
            page.goto(s.base + "/")
            summary = readonly_query(s.url, "SELECT run_name, committed, damaged FROM run_summary ORDER BY run_name")
            rows = page.locator("#runs-table tbody tr")
            assert rows.count() == len(summary.rows)
            for i, (name, committed, damaged) in enumerate(summary.rows):
                cells = rows.nth(i).locator("td")
                assert cells.nth(0).inner_text() == name and cells.nth(1).inner_text() == str(committed)
                assert ("⚠" in cells.nth(4).inner_text()) == bool(damaged)
            shot(page, art / "ui-runs.png")

            # run page: the chart's points are metric_curve's, the table rows are the catalog's
            page.click("a.run-link:text-is('exp1')")
            page.wait_for_function("window.ckptdbChart && window.ckptdbChart.uplot")
            expected = [(p.step_nr, p.value, p.state, p.pinned) for p in metric_curve(s.url, "exp1", "score")]
            drawn = page.evaluate("window.ckptdbChart.points.map(p => [p.step, p.value, p.state, p.pins.length > 0])")
            assert [tuple(p) for p in drawn] == expected
            assert page.evaluate("window.ckptdbChart.uplot.data[0]") == [p[0] for p in expected]
            assert {p[2] for p in expected} >= {"committed", "deleted", "corrupt"} and any(p[3] for p in expected)
            page.select_option("#metric-select", "valid_loss")
            page.wait_for_function("window.ckptdbChart && window.ckptdbChart.metric === 'valid_loss'")
            expected = [(p.step_nr, p.value) for p in metric_curve(s.url, "exp1", "valid_loss")]
            assert [
                tuple(p) for p in page.evaluate("window.ckptdbChart.points.map(p => [p.step, p.value])")
            ] == expected
            box = page.locator("#chart .u-over").bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
            page.wait_for_function("document.getElementById('chart-hover').textContent.startsWith('step ')")
            assert "step 600" in page.inner_text("#chart-hover")

            cat = Catalog(s.url, create=False)
            run = cat.get_run("exp1")
            table = [
                (int(r.get_attribute("data-step") or -1), r.get_attribute("data-state"))
                for r in page.locator("#checkpoints-table tbody tr").all()
            ]
            assert table == [
                (c.step_nr, c.state) for c in sorted(cat.checkpoints(run.id), key=lambda c: (-c.step_nr, -c.id))
            ]
            page.wait_for_selector("#plan-summary")
            assert "keep_last(3)" in page.inner_text("#plan-summary")  # the run's last policy
            page.fill("#policy-input", "--keep-last 1")
            page.click("#plan-form button")
            page.wait_for_function("document.getElementById('plan-summary').textContent.includes('keep_last(1)')")
            plan = cat.retention_plan(run.id, KeepLast(1).components())
            assert page.inner_text("#plan-delete") == str(len(plan.delete))
            assert [
                int(x)
                for x in page.locator("#plan-table tr[data-action='delete']").evaluate_all(
                    "rs => rs.map(r => r.dataset.step)"
                )
            ] == plan.delete
            assert cat.committed_steps(run.id) == [300, 400, 600]  # a dry run: nothing deleted
            shot(page, art / "ui-run.png")

            # a checkpoint saved while the page is open shows up within seconds
            m = s.managers["exp1"]
            m.begin_checkpoint(700)
            m.save_state({"w": 7})
            m.save_score(-1.0)
            m.save_score(1.0, metric="valid_loss")
            m.commit_checkpoint()
            page.wait_for_selector("#checkpoints-table tr[data-step='700'][data-state='committed']", timeout=10_000)
            page.wait_for_function("window.ckptdbChart.points.some(p => p.step === 700)", timeout=10_000)

            # checkpoint page: files, sizes, digests, state, commands
            page.click("#checkpoints-table a.step-link:text-is('500')")
            page.wait_for_selector("#files-table")
            live = cat.live(run.id, 500)
            assert live is not None and live.state == "corrupt"
            files = {f.path: f for f in cat.shards(live.id, include_removed=True)}
            shown = page.locator("#files-table tbody tr").all()
            assert {r.get_attribute("data-path") for r in shown} == set(files)
            for r in shown:
                f = files[r.get_attribute("data-path") or ""]
                cells = r.locator("td")
                assert cells.nth(2).inner_text() == str(f.size_bytes)
                assert cells.nth(3).inner_text() == f"{f.hash_algorithm}:{f.digest}"
                assert cells.nth(4).inner_text() == f.kind
            assert "corrupt" in page.inner_text("h1")
            assert "select=500" in page.inner_text("#cmd-load") and "--step 500" in page.inner_text("#cmd-export")
            assert "tokens_seen" in page.inner_text("#metadata")
            shot(page, art / "ui-checkpoint.png")

            # SQL page: a cookbook example, its result as the catalog answers it, CSV, a refused write
            page.click("nav a:text-is('SQL')")
            page.click("#examples a.example >> nth=0")
            page.wait_for_selector("#sql-result")
            q = page.input_value("#sql-q")
            res = readonly_query(s.url, q)
            assert page.locator("#sql-result tbody tr").count() == len(res.rows)
            assert page.locator("#sql-result thead th").all_inner_texts() == res.columns
            with page.expect_download() as dl:
                page.click("#csv-link")
            csv_text = Path(dl.value.path()).read_text()
            assert csv_text.splitlines()[0] == ",".join(res.columns) and len(csv_text.splitlines()) == len(res.rows) + 1
            shot(page, art / "ui-sql.png")
            assert not errors, errors  # (the refusal below answers 400, which the console reports)
            page.fill("#sql-q", "DELETE FROM checkpoints")
            page.click("#sql-run")
            assert "read-only" in page.inner_text("#sql-error")
            assert readonly_query(s.url, "SELECT COUNT(*) FROM checkpoints").rows[0][0] == 11
        finally:
            browser.close()
    assert sorted(p.name for p in art.iterdir()) == ["ui-checkpoint.png", "ui-run.png", "ui-runs.png", "ui-sql.png"]
