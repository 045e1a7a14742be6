"""Deployment figures through the gateway: the REST task view carries them (gRPC carries the same JSON), and the
web view, in a real headless browser, adds them to the trial table and draws metric against latency with size
as the marker and the Pareto set."""

from __future__ import annotations

import pytest

from tests.gateway_fixtures import TOKEN, browser, gateway, http  # noqa: F401  (fixtures)
from tests.peers import HW, ScriptedWorker, done, figures_answers, spec

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi")
pytest.importorskip("playwright")
TABLE = {0: (0.95, 50.0), 1: (0.5, 5.0), 2: (0.99, 20.0), 3: (0.97, 20.5)}
PAGE = """() => ({
    latency: [...document.querySelectorAll('#trials tbody td.latency')].map(td => td.textContent),
    speedup: [...document.querySelectorAll('#trials tbody td.speedup')].map(td => td.textContent),
    pareto: [...document.querySelectorAll('#trials tbody td.pareto')].map(td => td.textContent),
    dots: [...document.querySelectorAll('#tradeoff circle.tradeoff')].map(c => [c.dataset.index, c.getAttribute('r')]),
    front: [...document.querySelectorAll('#tradeoff circle.pareto')].map(c => c.dataset.index),
    fp32: !!document.querySelector('#tradeoff #fp32-point'), deployed: document.querySelector('#deployed')?.textContent,
})"""


async def test_the_web_view_shows_figures_and_the_tradeoff_chart(gateway, http, client, broker, browser):
    w = await ScriptedWorker(broker.endpoints["workers"], "s1", slots=4, answer=figures_answers(TABLE),
                             hardware=HW).start()
    try:
        task_id = await client.submit(spec(config_set=[{"rtn": {"bits": [0, 1, 2, 3]}}], objective="latency"))
        await done(client, task_id)
    finally:
        await w.stop()
    view = (await http.get(f"/v1/tasks/{task_id}")).json()  # REST: the task view with its figures
    assert view["winner"]["index"] == 2 and view["winner"]["deploy"]["speedup"] == 5.0
    assert view["baseline_deploy"]["latency_ms"] == 100.0 and view["pareto"] == [2]

    page = await browser.new_page(viewport={"width": 1200, "height": 1100})
    await page.add_init_script(f"localStorage.setItem('nsd-token', {TOKEN!r})")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{gateway.endpoints['http']}/#/task/{task_id}")
    await page.wait_for_selector("#tradeoff circle.tradeoff", timeout=30_000)
    shown = await page.evaluate(PAGE)
    assert errors == []
    assert shown["latency"] == ["50 ms", "–", "20 ms", "20.5 ms"] and shown["speedup"][2] == "5.00×"
    assert shown["pareto"][2] == "★" and shown["pareto"][0] == ""
    assert [i for i, _ in shown["dots"]] == ["0", "2", "3"] and shown["front"] == ["2"] and shown["fp32"]
    assert "5.00× FP32" in shown["deployed"]
