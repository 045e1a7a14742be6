"""The broker's side of CURVE: its identity and a ZAP handler with one allowlist per role (see the
package docstring for how the broker drives it). The handler names each connection (its User-Id, which
libzmq attaches to every message the peer sends): a worker by its public key (Z85, as the broker has always
bound worker ids to keys), a key on the client socket by `ROLE:NAME[:code]` (`nsd.tenants.user_id`): its
name is its tenant (README "Privacy")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.base import Authenticator
from zmq.utils import z85

from nsd.security.client import ClientKeys
from nsd.security.keys import ROLE_DOMAINS, allowlist_dir, allowlist_entries, read_flags, read_secret_certificate
from nsd.tenants import user_id

log = logging.getLogger("nsd.security")

#: ZAP domain for each broker socket (Broker.addresses' names). Workers never subscribe to events.
SOCKET_DOMAINS = {"clients": "clients", "workers": "workers", "events": "clients", "peer": "peers"}


@dataclass(frozen=True)
class Entry:
    """One allowlisted key: its role, its name (a tenant, for client-socket roles) and its flags."""

    role: str
    name: str
    flags: frozenset[str] = frozenset()

    def user_id(self, public: bytes) -> str:
        if self.role in ("worker", "peer"):
            return public.decode("ascii")  # workers: their key (the broker binds worker ids to keys)
        return user_id(self.role, self.name, "code" in self.flags)


class _Allowlists:
    """The credentials provider the authenticator calls for each CURVE handshake."""

    def __init__(self) -> None:
        self.keys: dict[str, frozenset[bytes]] = {domain: frozenset() for domain in (*ROLE_DOMAINS.values(), "peers")}
        self.entries: dict[str, dict[bytes, Entry]] = {domain: {} for domain in self.keys}
        self._logged: set[tuple[str, bytes]] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys.get(domain, frozenset())
        if not allowed and (domain, key) not in self._logged and len(self._logged) < 10_000:
            self._logged.add((domain, key))  # refused peers may retry: log each key once per reload
            other = [d for d, keys in self.keys.items() if d != domain and key in keys]
            why = f" (it is allowed on {other[0]}: a key has one role only)" if other else ""
            log.warning("refused CURVE key %s on the %s domain: not in its allowlist%s",
                        key.decode("ascii", "replace"), domain, why)
        return allowed


class _Authenticator(Authenticator):
    """pyzmq's authenticator, naming each connection after its allowlist entry (its User-Id).

    pyzmq asks `curve_user_id(key)` right after `_authenticate_curve(domain, key)` allowed the key, in the
    same coroutine with no await in between (handle_zap_message); the domain is remembered for it."""

    def __init__(self, ctx, allowlists: _Allowlists, **kw):
        super().__init__(ctx, **kw)
        self._allowlists, self._domain = allowlists, ""

    async def _authenticate_curve(self, domain: str, client_key: bytes):
        self._domain = domain
        return await super()._authenticate_curve(domain, client_key)

    def curve_user_id(self, client_public_key: bytes) -> str:
        public = z85.encode(client_public_key)
        entry = self._allowlists.entries.get(self._domain, {}).get(public)
        # Not in the allowlist any more (a reload raced the handshake): a name no tenant has.
        return entry.user_id(public) if entry is not None else "client:\x00unknown"


class CurveServer:
    """The broker's CURVE identity plus a ZAP handler with one allowlist per role.

    secret_cert: the broker's `.key_secret` file. keys_dir: holds `workers/` and `clients/`.
    Raises KeyFileError at once for a missing or public-only secret_cert.
    """

    def __init__(self, secret_cert: Path, keys_dir: Path):
        self.ctx: zmq.Context | None = None
        self.secret_cert, self.keys_dir = Path(secret_cert), Path(keys_dir)
        self.public_key, self._secret_key = read_secret_certificate(self.secret_cert, "the broker")
        self._allowlists = _Allowlists()
        self._auth: Authenticator | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._auth is not None

    def start(self, ctx: zmq.Context) -> CurveServer:
        """Load the allowlists and start the ZAP handler in ctx (the broker's zmq.asyncio.Context; ZAP
        handlers are per context: one CurveServer per context). Call in the running loop, before any bind."""
        if self._auth is not None:
            raise RuntimeError("CurveServer already started")
        asyncio.get_running_loop()  # fail here, not at the first handshake
        self.reload()
        self.ctx = ctx
        # The base Authenticator, driven by our own task (not AsyncioAuthenticator, whose stop() cancels
        # its task without awaiting it). No IP allow/deny: any address may try; the key decides.
        auth = _Authenticator(self.ctx, self._allowlists, log=logging.getLogger("nsd.security.zap"))
        try:
            auth.start()  # binds inproc://zeromq.zap.01, one per context
        except zmq.ZMQError as exc:
            auth.stop()  # pyzmq leaves the unbound REP socket open, and ctx.term() would hang on it
            raise RuntimeError(f"this zmq context already has a ZAP handler ({exc}): one CurveServer per "
                               f"context") from None
        auth.configure_curve_callback("workers", self._allowlists)
        auth.configure_curve_callback("clients", self._allowlists)
        auth.configure_curve_callback("peers", self._allowlists)  # a broker pair's link
        self._auth = auth
        self._task = asyncio.create_task(self._serve(auth), name="nsd-zap")
        return self

    def apply(self, sock: zmq.Socket, domain: str) -> zmq.Socket:
        """Make sock a CURVE server in domain ("workers" or "clients"); call before sock.bind."""
        if domain not in self._allowlists.keys:
            raise ValueError(f"unknown ZAP domain {domain!r}: expected one of {sorted(self._allowlists.keys)}")
        if self._auth is None:
            raise RuntimeError("start() the CurveServer before applying it to a socket")
        if sock.getsockopt(zmq.LAST_ENDPOINT):
            raise RuntimeError("apply CURVE before bind: the socket is bound already")
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler -> refuse all, not accept all
        sock.curve_server = True
        sock.curve_secretkey = self._secret_key
        sock.curve_publickey = self.public_key
        sock.zap_domain = domain.encode()
        return sock

    def reload(self) -> dict[str, int]:
        """Re-read every role's allowlist (creating empty folders); returns {role: number of keys}.

        Unreadable entries are skipped with a warning. Affects new connections only (a connection's
        User-Id, and so its tenant and flags, is fixed at its handshake).
        """
        entries: dict[str, dict[bytes, Entry]] = {domain: {} for domain in (*ROLE_DOMAINS.values(), "peers")}
        counts = {}
        for role, domain in ROLE_DOMAINS.items():
            folder = allowlist_dir(self.keys_dir, role)
            folder.mkdir(parents=True, exist_ok=True)
            found = allowlist_entries(folder)
            counts[role] = len(found)
            for path, key in found:
                if key in entries[domain]:  # hand-copied into two folders: one key, one role
                    log.warning("ignoring %s: this key is also allowed as a %s", path, entries[domain][key].role)
                    continue
                entries[domain][key] = Entry(role, path.stem, read_flags(path))
            if not found and role in ("worker", "client"):
                log.warning("no %s keys are allowed yet (%s is empty): no %s can connect; add one with "
                            "`nsd keys allow --role %s FILE.key --keys-dir %s`", role, folder, role, role,
                            self.keys_dir)
        # The other broker of a pair holds this same key pair: the one key of the pair's link.
        entries["peers"] = {self.public_key: Entry("peer", "peer")}
        self._allowlists.entries = entries
        self._allowlists.keys = {domain: frozenset(found) for domain, found in entries.items()}
        self._allowlists._logged.clear()
        log.info("CURVE allowlists: %s from %s", ", ".join(f"{n} {role} key(s)" for role, n in counts.items()),
                 self.keys_dir)
        return counts

    def peer_keys(self) -> ClientKeys:
        """The keys a broker connects to its pair's other broker with: both hold this one key pair."""
        return ClientKeys(self.public_key, self._secret_key, self.public_key)

    def tenant_of(self, key: str) -> str | None:
        """The tenant (client key name) a Z85 public key is allowed as: tasks from before tenants were owned by keys."""
        entry = self._allowlists.entries.get("clients", {}).get(key.encode("ascii", "replace"))
        return entry.name if entry is not None and entry.role == "client" else None

    def trusted_worker(self, key: str | None) -> bool:
        """Whether a worker's key (its User-Id) is allowed with `--trusted`."""
        entry = self._allowlists.entries.get("workers", {}).get((key or "").encode("ascii", "replace"))
        return entry is not None and "trusted" in entry.flags

    async def stop(self) -> None:
        """Stop the ZAP handler. Close the CURVE sockets first; call before ctx.term(). Idempotent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    async def _serve(self, auth: Authenticator) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(auth.zap_socket, zmq.POLLIN)
        while True:
            await poller.poll()
            try:
                msg = auth.zap_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            try:
                await auth.handle_zap_message(msg)
            except Exception:  # never leave libzmq waiting for a reply it will not get
                log.exception("ZAP request failed; refusing it")
                with contextlib.suppress(Exception):  # ZAP (RFC 27) reply frames: version, id, status, text, user, meta
                    await auth.zap_socket.send_multipart([b"1.0", msg[1], b"500", b"internal error", b"", b""])

