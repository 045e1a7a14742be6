"""CURVE encryption and authentication (zmq.auth) with one key allowlist per role.

README "Security (CURVE)": a client key cannot register as a worker and a worker key cannot submit. Every
broker socket is a CURVE server in a ZAP domain, and each role has its own allowlist directory:

    ZAP domain "workers"  ->  KEYS_DIR/workers/*.key   (the workers ROUTER)
    ZAP domain "clients"  ->  KEYS_DIR/clients/*.key   (the clients ROUTER and the events XPUB),
                              KEYS_DIR/gateways/*.key  (keys that may act for any tenant: nsd.tenants)
                              KEYS_DIR/admins/*.key    (keys that see every tenant)

Key files are pyzmq/czmq certificates: `NAME.key` holds the public key, `NAME.key_secret` the key pair.
An allowlist entry may carry flags in the certificate's `metadata` section: `code = "true"` (a client,
admin or gateway may submit python recipes: README "Privacy") and `trusted = "true"` (a worker whose
results other tenants may reuse when the broker shares its metric cache).

The ZAP handler names each connection (its User-Id, which libzmq attaches to every message the peer
sends): a worker by its public key (Z85, as the broker has always bound worker ids to keys), a key on
the client socket by `ROLE:NAME[:code]` (`nsd.tenants.user_id`): the name is the tenant.

Broker side::

    curve = CurveServer(secret_cert, keys_dir)   # e.g. in Broker.__init__: bad key files fail early
    curve.start(ctx)                              # in the running loop, before any bind
    curve.apply(sock, SOCKET_DOMAINS["clients"])               # on each socket, before bind
    ...
    curve.reload()                                             # re-read the allowlists (e.g. on SIGHUP)
    ... close the sockets ...
    await curve.stop()                                         # after the sockets are closed, before ctx.term()

Worker/client side::

    keys = ClientKeys.load(secret_cert, server_public)  # once, at start: a bad file fails early
    keys.apply(sock)                                    # on each new DEALER/SUB, before connect

Two libzmq behaviours this module guards against:

* A CURVE server with no ZAP handler in its context accepts *every* client key (RFC 26's "legacy"
  mode): only encryption, no authentication. `apply` sets ZMQ_ZAP_ENFORCE_DOMAIN so a socket whose
  handler is missing (not started yet, or already stopped) refuses every peer instead.
* ZAP runs once per connection, at the handshake. A reload (or a revoked key) affects new connections
  only; connections already authenticated stay up until they drop or the broker restarts.

Long module: CURVE end to end — key files, the broker's ZAP handler and the client side — read together
because each side's checks mirror the other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.base import Authenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from nsd.config import default_state_dir
from nsd.tenants import user_id

log = logging.getLogger("nsd.security")

ROLES = ("worker", "client", "gateway", "admin")
#: The allowlist folder of each role, under the keys dir.
ROLE_FOLDERS = {"worker": "workers", "client": "clients", "gateway": "gateways", "admin": "admins"}
#: The ZAP domain each role's keys are accepted on: gateways and admins are clients of the broker.
ROLE_DOMAINS = {"worker": "workers", "client": "clients", "gateway": "clients", "admin": "clients"}
#: ZAP domain for each broker socket (Broker.addresses' names). Workers never subscribe to events.
SOCKET_DOMAINS = {"clients": "clients", "workers": "workers", "events": "clients"}
#: Flags an allowlist entry may carry (`metadata` section), and the roles they mean something for.
FLAGS = {"code": ("client", "gateway", "admin"), "trusted": ("worker",)}

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyFileError(ValueError):
    """A key file is missing, unreadable, of the wrong kind or malformed. The message says what to do."""


# ---- locations -------------------------------------------------------------------------------------


def default_keys_dir() -> Path:
    """The broker's allowlists: the default state dir's `keys/`."""
    return default_state_dir() / "keys"


def default_key_dir() -> Path:
    """Where `nsd keys generate` writes key pairs: `$XDG_CONFIG_HOME/nsd/keys` (~/.config/nsd/keys)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nsd" / "keys"


def allowlist_dir(keys_dir: Path, role: str) -> Path:
    if role not in ROLE_FOLDERS:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return Path(keys_dir) / ROLE_FOLDERS[role]


# ---- key files -------------------------------------------------------------------------------------


def read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    """(public key, secret key or None), both Z85, from a certificate file; KeyFileError if it is not one."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.suffix not in (PUBLIC_SUFFIX, SECRET_SUFFIX):
            hint = " (key files end in .key or .key_secret; make a pair with `nsd keys generate NAME`)"
        raise KeyFileError(f"key file {path} does not exist{hint}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path} is not a CURVE certificate ({exc}); make one with `nsd keys generate NAME`") \
            from None
    for kind, key in (("public", public), ("secret", secret)):
        if key is not None and not _valid_z85_key(key):
            raise KeyFileError(f"{path}: its {kind} key is not a 40-character Z85 CURVE key; the file is damaged")
    return public, secret


def _valid_z85_key(key: bytes) -> bool:
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def _secret_cert(path: Path, what: str) -> tuple[bytes, bytes]:
    public, secret = read_certificate(path)
    if secret is None:
        raise KeyFileError(f"{path} is a public certificate: {what} needs its secret key, the "
                           f"{SECRET_SUFFIX} file that `nsd keys generate` wrote next to it")
    mode = Path(path).stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret key file %s is readable by other users (mode %o); chmod 600 it", path,
                    stat.S_IMODE(mode))
    return public, secret


def _public_cert_text(public: bytes, comment: str, flags: frozenset[str] = frozenset()) -> str:
    # The format pyzmq's zmq.auth.load_certificate(s) and czmq read (both skip the metadata lines).
    now = datetime.datetime.now().isoformat(timespec="seconds")
    metadata = "".join(f"    {flag} = \"true\"\n" for flag in sorted(flags))
    return (f"#   ZeroMQ CURVE Public Certificate\n#   {comment}, {now}\n\n"
            f"metadata\n{metadata}curve\n    public-key = \"{public.decode('ascii')}\"\n")


_FLAG_LINE = re.compile(r'\s+([a-z_]+)\s*=\s*"?(true|false)"?\s*')


def read_flags(path: Path) -> frozenset[str]:
    """The flags (`code`, `trusted`) an allowlist entry's metadata section sets to true."""
    flags, section = set(), None
    for line in Path(path).read_text(errors="replace").splitlines():
        if line and not line[0].isspace():
            section = line.strip()
            continue
        match = _FLAG_LINE.fullmatch(line)
        if section == "metadata" and match and match.group(1) in FLAGS and match.group(2) == "true":
            flags.add(match.group(1))
    return frozenset(flags)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create path with mode; FileExistsError if it exists (O_EXCL: never overwrites, no race)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # not left to the umask
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        path.unlink()
        raise
    os.close(fd)


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write `NAME.key` (public, 0644) and `NAME.key_secret` (secret, 0600) into directory.

    Uses zmq.auth.create_certificates, in a private temporary folder, so the secret key is never
    readable by others, not even for a moment. Refuses (FileExistsError) to overwrite either file.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad key name {name!r}: use letters, digits, '.', '_' or '-' (a file name, not a path)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; not overwriting a key (choose another name, or "
                                  f"delete it first if it is really unused)")
    tmp = Path(tempfile.mkdtemp(prefix=".nsd-keygen-", dir=directory))  # mode 0700
    try:
        tmp_public, tmp_secret = zmq.auth.create_certificates(tmp, name)
        _write_new(secret_path, Path(tmp_secret).read_bytes(), 0o600)
        try:
            _write_new(public_path, Path(tmp_public).read_bytes(), 0o644)
        except BaseException:
            secret_path.unlink()
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return public_path, secret_path


def allow(keys_dir: Path, role: str, public_key_file: Path, code: bool = False, trusted: bool = False) -> Path:
    """Add a key to a role's allowlist: writes `KEYS_DIR/<role>s/<name>.key` and returns its path.

    Only the public key is written, even if public_key_file is a secret certificate. `<name>` is the
    file's name without `.key`/`.key_secret` (for clients, gateways and admins: the tenant). Adding a
    key that is already allowed for this role returns the existing entry, with its flags set to these;
    a key allowed for another role is refused (one key, one role), and so is a different key under a
    name already taken. `code`: may submit python recipes (client, gateway, admin); `trusted`: a worker
    whose results other tenants may reuse (README "Privacy").
    """
    target_dir = allowlist_dir(keys_dir, role)
    flags = frozenset(f for f, wanted in (("code", code), ("trusted", trusted)) if wanted)
    for flag in flags:
        if role not in FLAGS[flag]:
            raise ValueError(f"--{flag} is for {' and '.join(FLAGS[flag])} keys, not a {role}")
    public, _ = read_certificate(public_key_file)
    source = Path(public_key_file)
    name = source.name.removesuffix(SECRET_SUFFIX).removesuffix(PUBLIC_SUFFIX)
    if not _NAME.fullmatch(name):
        raise ValueError(f"cannot name an allowlist entry after {source.name!r}: rename the file to NAME.key")
    for other in ROLES:
        if other != role:
            for entry, key in _entries(allowlist_dir(keys_dir, other)):
                if key == public:
                    raise ValueError(f"this key is already allowed as a {other} ({entry}); a key may have "
                                     f"one role only: make a separate pair with `nsd keys generate` for the {role}")
    for entry, key in _entries(target_dir):
        if key == public:
            if read_flags(entry) != flags:  # the same key again, with other flags: they change
                tmp = entry.with_name(f".{entry.name}.new")
                tmp.unlink(missing_ok=True)
                _write_new(tmp, _public_cert_text(public, f"nsd {role} key {entry.stem!r}", flags).encode(), 0o644)
                os.replace(tmp, entry)
            return entry
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{name}{PUBLIC_SUFFIX}"
    if target.exists():
        raise FileExistsError(f"another {role} key is already allowed as {target}; rename {source} "
                              f"(or revoke the old one first)")
    _write_new(target, _public_cert_text(public, f"nsd {role} key {name!r}", flags).encode(), 0o644)
    return target


def revoke(keys_dir: Path, role: str, name: str) -> Path:
    """Remove `NAME.key` from a role's allowlist. New connections are refused once the broker reloads;
    connections already authenticated stay up until they drop (ZAP runs only at the handshake)."""
    if not _NAME.fullmatch(name.removesuffix(PUBLIC_SUFFIX)):
        raise ValueError(f"bad key name {name!r}")
    path = allowlist_dir(keys_dir, role) / f"{name.removesuffix(PUBLIC_SUFFIX)}{PUBLIC_SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(f"no {role} key named {name!r} in {path.parent}")
    path.unlink()
    return path


def list_keys(keys_dir: Path) -> dict[str, list[tuple[str, str, list[str]]]]:
    """{role: [(name, Z85 public key or a problem in brackets, flags)]}, sorted by name."""
    out: dict[str, list[tuple[str, str, list[str]]]] = {}
    for role in ROLES:
        rows = []
        folder = allowlist_dir(keys_dir, role)
        for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")) if folder.is_dir() else []:
            try:
                rows.append((path.stem, read_certificate(path)[0].decode("ascii"), sorted(read_flags(path))))
            except KeyFileError as exc:
                rows.append((path.stem, f"[unreadable: {exc}]", []))
        out[role] = rows
    return out


def _entries(folder: Path) -> list[tuple[Path, bytes]]:
    """(file, Z85 public key) for every readable `*.key` in folder (what pyzmq's load_certificates globs)."""
    entries = []
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")) if folder.is_dir() else []:
        try:
            entries.append((path, read_certificate(path)[0]))
        except KeyFileError as exc:
            log.warning("ignoring allowlist entry %s: %s", path, exc)
    return entries


# ---- broker side -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One allowlisted key: its role, its name (a tenant, for client-socket roles) and its flags."""

    role: str
    name: str
    flags: frozenset[str] = frozenset()

    def user_id(self, public: bytes) -> str:
        if self.role == "worker":
            return public.decode("ascii")  # workers: their key (the broker binds worker ids to keys)
        return user_id(self.role, self.name, "code" in self.flags)


class _Allowlists:
    """The credentials provider the authenticator calls for each CURVE handshake."""

    def __init__(self) -> None:
        self.keys: dict[str, frozenset[bytes]] = {domain: frozenset() for domain in set(ROLE_DOMAINS.values())}
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
        self.public_key, self._secret_key = _secret_cert(self.secret_cert, "the broker")
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
        entries: dict[str, dict[bytes, Entry]] = {domain: {} for domain in set(ROLE_DOMAINS.values())}
        counts = {}
        for role, domain in ROLE_DOMAINS.items():
            folder = allowlist_dir(self.keys_dir, role)
            folder.mkdir(parents=True, exist_ok=True)
            found = _entries(folder)
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
        self._allowlists.entries = entries
        self._allowlists.keys = {domain: frozenset(found) for domain, found in entries.items()}
        self._allowlists._logged.clear()
        log.info("CURVE allowlists: %s from %s", ", ".join(f"{n} {role} key(s)" for role, n in counts.items()),
                 self.keys_dir)
        return counts

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


# ---- worker / client side --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientKeys:
    """A worker's or client's key pair and the broker's public key, loaded once."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_cert: Path, server_public: Path) -> ClientKeys:
        public, secret = _secret_cert(secret_cert, "connecting with CURVE")
        server, server_secret = read_certificate(server_public)
        if server_secret is not None:
            log.warning("%s holds the broker's SECRET key; clients and workers need only its public %s file",
                        server_public, PUBLIC_SUFFIX)
        return cls(public, secret, server)

    def apply(self, sock: zmq.Socket) -> zmq.Socket:
        """Make sock a CURVE client of the broker; call before sock.connect."""
        if sock.getsockopt(zmq.LAST_ENDPOINT):
            raise RuntimeError("apply CURVE before connect: the socket is connected already")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server
        return sock


def apply_client(sock: zmq.Socket, secret_cert: Path, server_public: Path) -> zmq.Socket:
    """One-shot `ClientKeys.load(secret_cert, server_public).apply(sock)`."""
    return ClientKeys.load(secret_cert, server_public).apply(sock)


_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeWatch:
    """Why a connecting asyncio socket has no broker: turns a silent timeout into an actionable line.

    Attach before connect (a refused key is not retried, so its one failure must be seen); ask
    `await watch.problem()` when a request times out; `close()` before closing the socket.
    """

    def __init__(self, sock: zmq.asyncio.Socket, role: str = "client"):
        self.role = role
        self._sock = sock
        self._mon = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._last: str | None = None

    async def problem(self) -> str | None:
        """The latest handshake failure as a sentence, or None (none yet, or a success since)."""
        while await self._mon.poll(0):
            event = await recv_monitor_message(self._mon)
            self._last = self._describe(event["event"], event["value"])
        return self._last

    def _describe(self, event: int, value: int) -> str | None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the broker refused this {self.role}'s CURVE key (ZAP status {value}): add its public "
                    f".key file to the broker with `nsd keys allow --role {self.role} FILE.key`")
        # Which side notices a mechanism mismatch first is a race: go by our own mechanism instead.
        if self._sock.getsockopt(zmq.MECHANISM) != zmq.CURVE:
            return (f"the broker refused a connection without CURVE: it requires keys; give this {self.role} "
                    f"its .key_secret file and the broker's public .key file")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return f"the broker does not use CURVE, but this {self.role} was given keys"
        return ("the CURVE handshake with the broker failed: check that the server key given to this "
                f"{self.role} is the broker's public key (its .key file), and that the broker uses CURVE")

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._mon.close(linger=0)
