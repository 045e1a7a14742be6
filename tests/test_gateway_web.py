"""The web view in a real headless browser (Debian's chromium driven by Playwright; never Playwright's own
download): a running task's page updates trial by trial and shows the winner at the end."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from tests.conftest import RECIPES, ROOT, digits_spec
from tests.gateway_fixtures import TOKEN, browser  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi")
pytest.importorskip("playwright")
FINISHED = "passed,failed_goal,error".split(",")
PAGE_STATE = """() => ({
    state: document.querySelector('#state [data-state]')?.dataset.state ?? null,
    finished: [...document.querySelectorAll('#trials tbody tr')].filter(r => %s.includes(r.dataset.state)).length,
    rows: document.querySelectorAll('#trials tbody tr').length,
    winner: document.querySelector('#winner')?.textContent ?? null,
    points: document.querySelectorAll('#chart circle.point').length,
    goal: !!document.querySelector('#chart #goal-line'), baseline: !!document.querySelector('#chart #baseline-line'),
})""" % str(FINISHED)


async def test_task_page_shows_trials_updating_live_and_the_winner(gateway, http, client, start_workers, browser,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("NSD_TEST_SLOW_S", "2")  # each evaluate takes 2 s more: the page has time to be seen
    await start_workers(1)
    spec = digits_spec()
    spec["recipe"]["file"] = str(RECIPES / "slow.py")
    spec["model"]["shared"] = True  # slow.py imports a module beside it
    page = await browser.new_page(viewport={"width": 1200, "height": 900})
    await page.add_init_script(f"localStorage.setItem('nsd-token', {TOKEN!r})")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    task_id = (await http.post("/v1/tasks", json=spec)).json()["task_id"]
    await page.goto(f"{gateway.endpoints['http']}/#/task/{task_id}")

    seen_while_running: set[int] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 600
    while True:
        view = await page.evaluate(PAGE_STATE)
        if view["state"] == "tuning":
            seen_while_running.add(view["finished"])
            if view["finished"] >= 1 and not (tmp_path / "running.png").exists():
                await page.screenshot(path=str(tmp_path / "running.png"), full_page=True)
        if view["state"] in ("done", "failed", "cancelled") or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(seen_while_running) >= 2, f"the page did not update while the task ran: {seen_while_running}"
    result = (await http.get(f"/v1/tasks/{task_id}")).json()
    assert result["state"] == view["state"] == "done"
    await page.wait_for_function("() => !document.querySelector('#download').disabled", timeout=60_000)
    view = await page.evaluate(PAGE_STATE)
    winner = result["winner"]
    assert f"#{winner['index']} {winner['label']}" in view["winner"]
    assert await page.get_attribute(f"#trials tr[data-index='{winner['index']}']", "class") == "winner"
    assert view["finished"] == sum(t["state"] in FINISHED for t in result["trials"])
    assert view["points"] == sum(t["metric"] is not None for t in result["trials"]) and view["goal"] and view["baseline"]
    await page.screenshot(path=str(tmp_path / "done.png"), full_page=True)
    assert (tmp_path / "running.png").stat().st_size > 0 and (tmp_path / "done.png").stat().st_size > 0
    if os.environ.get("NSD_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        shutil.copy(tmp_path / "done.png", ROOT / "docs" / "gateway-task-page.png")

    await page.goto(f"{gateway.endpoints['http']}/#/")
    await page.wait_for_selector(f"#tasks tr[data-task='{task_id}'] [data-state='done']", timeout=30_000)
    await page.goto(f"{gateway.endpoints['http']}/#/cluster")
    await page.wait_for_selector("#workers tr[data-worker='w0']", timeout=30_000)
    assert errors == []


async def test_page_without_a_token_asks_for_one(gateway, browser):
    page = await browser.new_page()
    await page.goto(f"{gateway.endpoints['http']}/#/")
    await page.wait_for_function("() => document.querySelector('#message').textContent.includes('token')",
                                 timeout=30_000)
    assert await page.locator("#tasks").count() == 0
