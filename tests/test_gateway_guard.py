"""What a web page may ask of the gateway (issue 15, attack 1; the browser itself: test_gateway_attacks.py):
the decision as a pure function, then a real --no-auth gateway refusing what a hostile page would send."""

from __future__ import annotations

import pytest

from tests.conftest import DIGITS, digits_spec, free_port
from tests.gateway_fixtures import OCTETS, gateway_config

pytest.importorskip("fastapi")
HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def refusal(method="POST", scheme="http", **headers):
    from nsd.gateway.guard import refusal

    headers = {"host": "127.0.0.1:8550", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return refusal(method, headers, scheme, HOSTS)


@pytest.mark.parametrize("headers", [
    {},  # curl, httpx, a script: no Origin, no Sec-Fetch-Site
    {"origin": "http://127.0.0.1:8550", "sec_fetch_site": "same-origin", "content_type": "application/json"},
    {"host": "localhost:8550", "origin": "http://localhost:8550"},
    {"sec_fetch_site": "none"},  # typed by the user
    {"host": "[::1]:8550", "origin": "http://[::1]:8550"},
    {"content_type": "application/octet-stream"},
])
def test_what_a_tool_or_the_gateways_own_page_sends_is_let_through(headers):
    assert refusal(**headers) is None


@pytest.mark.parametrize("method, headers, status", [
    ("GET", {"host": "evil.example:8550"}, 421),  # DNS rebinding: the page's own name, pointed at us
    ("GET", {"host": "127.0.0.1.evil.example"}, 421),
    ("GET", {"host": ""}, 421),
    ("GET", {"host": "user@127.0.0.1:8550"}, 421),
    ("POST", {"origin": "http://attacker.example"}, 403),
    ("POST", {"origin": "http://127.0.0.1:9999"}, 403),  # another port is another origin
    ("POST", {"origin": "https://127.0.0.1:8550"}, 403),
    ("POST", {"origin": "null"}, 403),  # a sandboxed frame or a data: page
    ("GET", {"origin": "http://attacker.example"}, 403),
    ("POST", {"sec_fetch_site": "cross-site"}, 403),
    ("POST", {"sec_fetch_site": "same-site"}, 403),  # 127.0.0.1:9999 is the same site as :8550
    ("GET", {"sec_fetch_site": "cross-site", "sec_fetch_mode": "cors"}, 403),
    ("POST", {"content_type": "text/plain;charset=UTF-8"}, 415),  # what fetch(no-cors) sends unasked
    ("POST", {"content_type": "application/x-www-form-urlencoded"}, 415),  # a form; curl -d's default
    ("POST", {"content_type": "multipart/form-data; boundary=x"}, 415),
    ("DELETE", {"content_type": "text/plain"}, 415),
])
def test_what_a_hostile_page_sends_is_refused(method, headers, status):
    assert refusal(method, **headers)[0] == status


def test_a_link_followed_from_another_site_opens_the_web_view():
    assert refusal("GET", sec_fetch_site="cross-site", sec_fetch_mode="navigate") is None
    assert refusal("POST", sec_fetch_site="cross-site", sec_fetch_mode="navigate")[0] == 403


def test_served_hosts_are_the_bind_address_loopback_and_the_setting():
    from nsd.gateway.guard import served_hosts

    assert served_hosts("10.0.0.5", ["NSD.example.com."]) == HOSTS | {"10.0.0.5", "nsd.example.com"}
    assert served_hosts("0.0.0.0") == HOSTS  # a wildcard is not a name anyone sends
    assert refusal("GET", host="anything:1") is not None
    from nsd.gateway.guard import refusal as decide
    assert decide("GET", {"host": "anything:1"}, "http", frozenset({"*"})) is None


@pytest.fixture
async def open_gateway(broker, tmp_path):
    """The riskiest configuration a page can meet: --no-auth on loopback (no token stops anything)."""
    from nsd.gateway.server import GatewayServer

    server = GatewayServer(gateway_config(broker, tmp_path, no_auth=True))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def page(open_gateway):
    """An HTTP client that sends what a browser would, origin headers set per request."""
    import httpx

    async with httpx.AsyncClient(base_url=open_gateway.endpoints["http"], timeout=60) as c:
        yield c


async def test_no_auth_gateway_refuses_a_cross_origin_upload_and_submit_and_stores_nothing(page, client, open_gateway):
    recipe = (DIGITS / "recipe.py").read_bytes()
    attacks = [
        {"Origin": "http://attacker.example", "Content-Type": "text/plain;charset=UTF-8"},
        {"Origin": "http://attacker.example", "Content-Type": "application/octet-stream"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "null"},
    ]
    for headers in attacks:
        answer = await page.post("/v1/uploads", params={"name": "recipe.py"}, content=recipe, headers=headers)
        assert answer.status_code in (403, 415), (headers, answer.text)
    shared = digits_spec()
    shared["model"]["shared"] = True
    for headers in attacks:
        answer = await page.post("/v1/tasks", content=__import__("json").dumps(shared), headers=headers)
        assert answer.status_code in (403, 415), (headers, answer.text)
    assert open_gateway.gateway.uploaded_bytes == 0 and await client.list() == []
    # the same requests from a tool (or the gateway's own page) go through: the refusals were the origin's
    same_origin = {"Origin": open_gateway.endpoints["http"], "Sec-Fetch-Site": "same-origin"}
    answer = await page.post("/v1/uploads", params={"name": "recipe.py"}, content=recipe, headers={**OCTETS, **same_origin})
    assert answer.status_code == 201
    assert (await page.post("/v1/tasks", json=shared, headers=same_origin)).status_code == 201


async def test_simple_content_types_are_refused_even_without_origin_headers(page):
    """A tool must say what it sends: an upload is octet-stream or a tar, a spec is JSON (curl's -d default,
    a form, is refused), so no request a page can send without a preflight is ever accepted."""
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=b"):
        answer = await page.post("/v1/uploads", params={"name": "r.py"}, content=b"x", headers={"Content-Type": content_type})
        assert answer.status_code == 415 and "application/octet-stream" in answer.json()["error"]
    missing = await page.post("/v1/uploads", params={"name": "r.py"}, content=b"x")  # a Blob body has no type
    assert missing.status_code == 415 and "without a Content-Type" in missing.json()["error"]
    spec = await page.post("/v1/tasks", content=b"{}", headers={"Content-Type": "application/octet-stream"})
    assert spec.status_code == 415 and "application/json" in spec.json()["error"]


async def test_a_rebound_host_name_reads_nothing(page, client):
    spec = digits_spec()
    spec["model"]["shared"] = True
    task_id = await client.submit(spec)
    for path in ("/v1/tasks", f"/v1/tasks/{task_id}", "/healthz", "/", "/static/app.js", f"/v1/tasks/{task_id}/events"):
        answer = await page.get(path, headers={"Host": "rebound.attacker.example:8550"})
        assert answer.status_code == 421 and task_id not in answer.text, path
    assert (await page.get("/v1/tasks")).json()["tasks"][0]["task_id"] == task_id  # by its own name: served


async def test_the_old_screen_websocket_refuses_another_origin(open_gateway, client):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    spec = digits_spec()
    spec["model"]["shared"] = True
    task_id = await client.submit(spec)
    base = open_gateway.endpoints["http"].replace("http://", "ws://")
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{base}/task/screen/{task_id}", origin="http://attacker.example"):
            pass
    assert refused.value.response.status_code == 403
    async with connect(f"{base}/task/screen/{task_id}", origin=open_gateway.endpoints["http"]) as ws:
        assert (await ws.recv()).startswith(task_id)


@pytest.mark.parametrize("path", ["/", "/v1/tasks", "/static/app.js", "/docs", "/healthz", "/v1/tasks/nosuch",
                                  "/openapi.json"])
async def test_security_headers_on_every_answer(page, path):
    answer = await page.get(path)
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'none'" in csp and answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["cross-origin-resource-policy"] == "same-origin"
    if path.startswith("/v1/"):
        assert answer.headers["cache-control"] == "no-store"
    refused = await page.get(path, headers={"Host": "evil.example"})
    assert refused.status_code == 421 and refused.headers["x-frame-options"] == "DENY"


async def test_no_page_the_gateway_serves_has_inline_script(page):
    import re

    for path in ("/", "/docs"):
        html = (await page.get(path)).text
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts), path
        assert not re.search(r"\son\w+=", html), path  # no inline event handlers either


async def test_healthz_without_a_token_says_only_ok(broker, tmp_path):
    import httpx

    from nsd.gateway.server import GatewayServer
    from tests.gateway_fixtures import TOKEN

    nobody = f"tcp://127.0.0.1:{free_port()}"  # no broker answers here
    for endpoint, status, ok in ((broker.endpoints["clients"], 200, True), (nobody, 503, False)):
        config = gateway_config(broker, tmp_path, broker=endpoint, broker_timeout_s=1.0)
        server = GatewayServer(config)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.endpoints["http"]) as http:
                bare = await http.get("/healthz")
                assert bare.status_code == status and bare.json() == {"ok": ok}  # not where, which version, why
                full = (await http.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"})).json()
                assert full["ok"] is ok and (full.get("broker") or full.get("error"))
        finally:
            await server.stop()
