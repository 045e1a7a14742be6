"""What a browser may ask of the gateway, decided before any route runs (README "Web pages and the gateway").

A page on another origin can send "simple" requests (a form's POST, `fetch(..., {mode: "no-cors"})`)
without asking first, and a page whose own host name was re-pointed at the gateway (DNS rebinding) is, to
the browser, on the gateway's origin and may read every answer. So, on the HTTP door:
- the `Host` must be one the gateway serves (its bind address, loopback names, `allowed_hosts`);
- a request from another origin is refused: a browser says where it comes from in `Origin` and
  `Sec-Fetch-Site` (a top-level GET navigation, a link followed to the web view, is let through);
- a state-changing request cannot carry a content type a page may send unasked (text/plain, forms):
  the routes ask for JSON (tasks) or `application/octet-stream` / `application/x-tar` (uploads);
- every answer carries a content security policy without inline script, no framing, nosniff and no
  referrer. Tools that are not browsers (curl, httpx, gRPC) send neither Origin nor Sec-Fetch-Site.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Content types a page may send cross-origin without a CORS preflight (the fetch standard's list).
SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAME_ORIGIN_SITES = frozenset({"same-origin", "none"})  # none: typed by the user, not sent by a page
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def split_host(value: str | None) -> tuple[str, int | None] | None:
    """(name, port) of a Host or Origin authority, lower-cased; None when it is not one."""
    if not value:
        return None
    try:
        parts = urlsplit("//" + value.strip())
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.username is not None or parts.path or parts.query:
        return None
    return name.lower().rstrip("."), port


def served_hosts(bind_host: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str]:
    """The Host names the gateway answers to: its bind address (unless a wildcard), loopback, `extra`."""
    names = set(LOOPBACK_NAMES) | {h.lower().strip("[]").rstrip(".") for h in extra}
    try:
        if not ipaddress.ip_address(bind_host).is_unspecified:
            names.add(bind_host.lower())
    except ValueError:
        names.add(bind_host.lower())
    return frozenset(names)


def _same_origin(origin: str, scheme: str, host: tuple[str, int | None]) -> bool:
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    default = {"http": 80, "https": 443}.get(scheme)
    return (parts.scheme == scheme and (parts.hostname or "").lower() == host[0]
            and (origin_port or default) == (host[1] or default))


def refusal(method: str, headers: dict[str, str], scheme: str, hosts: frozenset[str]) -> tuple[int, str] | None:
    """Why a request must not be served ((status, message)), or None. Pure: header names lower-case;
    `scheme` is the request's (a WebSocket's ws/wss is compared as the page's http/https)."""
    host = split_host(headers.get("host"))
    if host is None or ("*" not in hosts and host[0] not in hosts):
        return 421, (f"this gateway does not serve host {headers.get('host', '')[:100]!r} "
                     "(README: allowed_hosts)")
    origin = headers.get("origin")
    if origin is not None and not _same_origin(origin, {"ws": "http", "wss": "https"}.get(scheme, scheme), host):
        return 403, f"requests from another origin ({origin[:100]!r}) are refused"
    site = headers.get("sec-fetch-site")
    navigation = method == "GET" and headers.get("sec-fetch-mode") == "navigate"
    if site is not None and site not in SAME_ORIGIN_SITES and not navigation:
        return 403, f"requests from another site (Sec-Fetch-Site: {site[:40]}) are refused"
    if method not in SAFE_METHODS and media_type(headers.get("content-type")) in SIMPLE_TYPES:
        return 415, (f"Content-Type {media_type(headers.get('content-type'))!r} is refused here: send JSON "
                     "(application/json) or, for an upload, application/octet-stream or application/x-tar")
    return None


class BrowserGuard:
    """ASGI middleware: `refusal` on every HTTP and WebSocket request; security headers on every answer."""

    def __init__(self, app, hosts: frozenset[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        why = refusal(scope.get("method", "GET"), headers, scope.get("scheme", "http"), self.hosts)
        if why is not None and scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": why[1][:120]})
        if why is not None:
            return await _answer(send, *why)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if scope["path"].startswith("/v1/") and b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))  # answers for one token, never for a cache
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _answer(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
