"""A real gateway (uvicorn + grpc.aio on random loopback ports) in front of the real test broker, and what
its tests share to talk to it (uploads as curl sends them, an SSE reader, gRPC upload parts, chromium).
tests/conftest.py loads this module as a plugin: every test module has the `gateway` and `http` fixtures
without importing them."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import DIGITS, digits_spec

TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdefgh"
LIMITS = {"max_body": 64 << 10, "max_upload": 4 << 20, "max_tar_members": 200, "max_tar_header": 4096}
KEEPALIVE_S = 0.5
OCTETS = {"Content-Type": "application/octet-stream"}
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def gateway_config(broker_daemon, tmp_path, **overrides):
    from nsd.gateway.config import GatewayConfig, Limits

    tokens = tmp_path / "tokens"
    if not tokens.exists():
        tokens.write_text(f"# name token [code]\nalice {TOKEN} code\nbob {BOB_TOKEN}\n")
    settings = dict(broker=broker_daemon.endpoints["clients"], http="127.0.0.1:0", grpc="127.0.0.1:0", tokens=tokens,
                    limits=Limits(**LIMITS), keepalive_s=KEEPALIVE_S)
    if overrides.get("no_auth"):
        settings.pop("tokens")
    return GatewayConfig(**{**settings, **overrides})


@pytest.fixture
async def gateway(broker, tmp_path):
    pytest.importorskip("fastapi")
    from nsd.gateway.server import GatewayServer

    server = GatewayServer(gateway_config(broker, tmp_path))
    await server.start()
    yield server
    await server.stop()
    assert server.client is None


@pytest.fixture
async def http(gateway):
    import httpx

    async with httpx.AsyncClient(base_url=gateway.endpoints["http"], timeout=60,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


async def upload_digits(http) -> dict:
    """The digits spec with its model and recipe uploaded through REST, as a curl user would."""
    spec = digits_spec()
    for section, key, path in (("model", "path", DIGITS / "model.pt"), ("recipe", "file", DIGITS / "recipe.py")):
        answer = await http.post("/v1/uploads", params={"name": path.name}, content=path.read_bytes(), headers=OCTETS)
        assert answer.status_code == 201, answer.text
        spec[section][key] = answer.json()["ref"]
    return spec


async def read_sse(http, task_id: str, last_event_id: int | None = None, stop_after: int | None = None) -> list[dict]:
    """Events from the SSE stream (checking each `id:` equals its seq), until it ends or `stop_after` events."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    events: list[dict] = []
    async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in answer.aiter_lines():
            if line.startswith(":"):
                continue  # a keep-alive comment
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
                continue
            if not fields:
                continue
            event = json.loads(fields["data"])
            assert int(fields["id"]) == event["seq"] and fields["event"] == event["kind"]
            events.append(event)
            fields = {}
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def without_page(view: dict) -> dict:
    """A gateway task view as the Python client's: the page note removed (a small task is one page)."""
    assert view["trials_page"]["total"] == len(view["trials"]), view["trials_page"]
    return {k: v for k, v in view.items() if k != "trials_page"}


def files_under(root) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None: a folder): two trees compare equal file by file."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def pb():
    from nsd.gateway import nsd_pb2

    return nsd_pb2


def upload_parts(name: str, data: bytes, tar: bool = False, sha256: str = "", chunk: int = 1 << 16):
    yield pb().UploadPart(header=pb().UploadHeader(name=name, tar=tar, sha256=sha256))
    for i in range(0, len(data), chunk):
        yield pb().UploadPart(data=data[i:i + chunk])


async def grpc_upload_digits(stub) -> dict:
    from tests.conftest import digits_spec

    spec = digits_spec()
    for section, key, path in (("model", "path", DIGITS / "model.pt"), ("recipe", "file", DIGITS / "recipe.py")):
        spec[section][key] = (await stub.Upload(upload_parts(path.name, path.read_bytes()), metadata=AUTH)).ref
    return spec


CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by the Makefile's test set-up; never Playwright's download
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


async def launch_chromium(playwright, *extra_args: str):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium")
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args],
                                            headless=True)


@pytest.fixture
async def browser():
    """A headless chromium, closed after the test."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        try:
            yield browser
        finally:
            await browser.close()
