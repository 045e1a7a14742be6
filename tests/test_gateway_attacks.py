"""Issue 15, attack 1, as a hostile page runs it in a real browser (Debian's chromium, driven by Playwright):
a page on another origin uploads a recipe and submits a task to a --no-auth gateway on loopback, then tries
to read the answers, directly and through DNS rebinding. Each step fails, and nothing is stored.

Chromium resolves the attacker's names to 127.0.0.1 (--host-resolver-rules): `attacker.test` serves the
page from a real HTTP server of the test's. For `rebind.test` the attacker's server answers the page's
first load on a port, then goes away and the gateway takes that very port: to the browser, the page's
later requests go to its own origin (what DNS rebinding achieves by re-pointing the name).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from nsd.blobs import make_ref
from nsd.transfer import packed
from tests.conftest import DIGITS, digits_spec
from tests.gateway_fixtures import gateway_config, launch_chromium

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi")
pytest.importorskip("playwright")
RESOLVE = "--host-resolver-rules=MAP attacker.test 127.0.0.1, MAP rebind.test 127.0.0.1"

CROSS_ORIGIN = """
window.report = (async () => {
  const out = {sent: []};
  const simple = [  // requests a page may send to any origin without asking (no CORS preflight)
    ["/v1/uploads?name=recipe.py", RECIPE],
    ["/v1/uploads?name=recipe.py", new Blob([RECIPE])],  // a Blob of no type: no Content-Type at all
    ["/v1/tasks", SPEC],
  ];
  for (const [path, body] of simple) {
    try { await fetch(GATEWAY + path, {method: "POST", mode: "no-cors", body}); out.sent.push(path); }
    catch (e) { out.sent.push("failed " + path); }
  }
  try { const r = await fetch(GATEWAY + "/v1/tasks"); out.read = await r.text(); }
  catch (e) { out.read = "blocked: " + e; }
  return out;
})();
"""
REBOUND = """
window.attack = async () => {
  const out = {};
  const call = async (path, options) => { const r = await fetch(path, options); return [r.status, await r.text()]; };
  out.list = await call("/v1/tasks");
  out.task = await call("/v1/tasks/" + TASK);
  out.events = await call("/v1/tasks/" + TASK + "/events");
  out.upload = await call("/v1/uploads?name=recipe.py",
                          {method: "POST", headers: {"Content-Type": "application/octet-stream"}, body: RECIPE});
  out.submit = await call("/v1/tasks", {method: "POST", headers: {"Content-Type": "application/json"}, body: SPEC});
  return out;
};
"""


def attack_page(script: str, **values) -> str:
    consts = "".join(f"const {name} = {json.dumps(value)};\n" for name, value in values.items())
    return f"<!doctype html><html><body><p>cute cats</p><script>\n{consts}{script}</script></body></html>"


async def serve_page(html: str, port: int = 0) -> asyncio.Server:
    """The attacker's web server: every request gets the page."""
    body = html.encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", port, reuse_address=True)


@pytest.fixture
async def open_gateway(broker, tmp_path):
    from nsd.gateway.server import GatewayServer

    server = GatewayServer(gateway_config(broker, tmp_path, no_auth=True, grpc=None))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def chromium():
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw, RESOLVE)
        try:
            yield browser
        finally:
            await browser.close()


def the_attack() -> tuple[str, str]:
    """The recipe's bytes and a spec naming it by the ref the gateway would give it (computable offline:
    the packer is deterministic)."""
    recipe = (DIGITS / "recipe.py").read_text()
    with packed(DIGITS / "recipe.py") as blob:
        ref = make_ref(blob.sha256, "recipe.py")
    spec = digits_spec()
    spec["model"]["shared"] = True
    spec["recipe"]["file"] = ref
    return recipe, json.dumps(spec)


async def test_a_page_on_another_origin_can_neither_submit_nor_read(open_gateway, chromium, client):
    victim = digits_spec()
    victim["model"]["shared"] = True
    victim_id = await client.submit(victim)  # someone's task the page would like to read
    recipe, spec = the_attack()
    gateway = open_gateway.endpoints["http"]
    server = await serve_page(attack_page(CROSS_ORIGIN, GATEWAY=gateway, RECIPE=recipe, SPEC=spec))
    try:
        page = await chromium.new_page()
        await page.goto(f"http://attacker.test:{server.sockets[0].getsockname()[1]}/")
        report = await page.evaluate("window.report")
    finally:
        server.close()
        await server.wait_closed()
    assert len(report["sent"]) == 3  # each went out (the answers, refusals, are opaque to the page, or an error)
    assert report["read"].startswith("blocked") and victim_id not in report["read"]
    assert open_gateway.gateway.uploaded_bytes == 0  # no recipe stored ...
    assert [t["task_id"] for t in await client.list()] == [victim_id]  # ... and no task submitted


async def test_dns_rebinding_reads_nothing_and_submits_nothing(broker, tmp_path, chromium, client):
    from nsd.gateway.server import GatewayServer

    victim = digits_spec()
    victim["model"]["shared"] = True
    victim_id = await client.submit(victim)
    recipe, spec = the_attack()
    attacker = await serve_page(attack_page(REBOUND, TASK=victim_id, RECIPE=recipe, SPEC=spec))
    port = attacker.sockets[0].getsockname()[1]
    page = await chromium.new_page()
    await page.goto(f"http://rebind.test:{port}/cats.html")
    attacker.close()
    await attacker.wait_closed()
    server = GatewayServer(gateway_config(broker, tmp_path, no_auth=True, grpc=None, http=f"127.0.0.1:{port}"))
    await server.start()  # the name now leads to the gateway
    try:
        report = await page.evaluate("window.attack()")
        uploaded = server.gateway.uploaded_bytes
    finally:
        await server.stop()
    for step in ("list", "task", "events", "upload", "submit"):
        status, text = report[step]
        assert status == 421 and victim_id not in text, (step, status, text[:200])
    assert uploaded == 0
    assert [t["task_id"] for t in await client.list()] == [victim_id]


async def test_the_web_view_and_docs_run_under_the_content_security_policy(open_gateway, chromium, client):
    """The policy forbids inline script; the gateway's own pages must not need any (no violation logged)."""
    victim = digits_spec()
    victim["model"]["shared"] = True
    task_id = await client.submit(victim)
    page = await chromium.new_page()
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    base = open_gateway.endpoints["http"]
    await page.goto(f"{base}/#/")
    await page.wait_for_selector(f"#tasks tr[data-task='{task_id}']", timeout=30_000)
    await page.goto(f"{base}/docs")
    # Swagger UI started from docs.js and read our OpenAPI 3.1 document: the operations are listed, no
    # "Unable to render this definition".
    await page.wait_for_selector("#swagger-ui .opblock", timeout=30_000)
    assert await page.locator("#swagger-ui .opblock").count() >= 10
    assert await page.locator("#swagger-ui .errors-wrapper").count() == 0
    assert problems == []
