"""CURVE key files and the broker's allowlists: where they live, making a pair, allowing, revoking and
listing keys (what `nsd keys` does). Key files are pyzmq/czmq certificates: `NAME.key` holds the public
key, `NAME.key_secret` the key pair; a role's allowlist is the folder `KEYS_DIR/<role>s/` of `.key` files."""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from nsd.config import default_state_dir

log = logging.getLogger("nsd.security")

ROLES = ("worker", "client", "gateway", "admin")
#: The allowlist folder of each role, under the keys dir.
ROLE_FOLDERS = {"worker": "workers", "client": "clients", "gateway": "gateways", "admin": "admins"}
#: The ZAP domain each role's keys are accepted on: gateways and admins are clients of the broker.
ROLE_DOMAINS = {"worker": "workers", "client": "clients", "gateway": "clients", "admin": "clients"}
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


def read_secret_certificate(path: Path, what: str) -> tuple[bytes, bytes]:
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
    """The flags (`code`, `trusted`) an allowlist entry's metadata section sets to true (README "Privacy")."""
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
            for entry, key in allowlist_entries(allowlist_dir(keys_dir, other)):
                if key == public:
                    raise ValueError(f"this key is already allowed as a {other} ({entry}); a key may have "
                                     f"one role only: make a separate pair with `nsd keys generate` for the {role}")
    for entry, key in allowlist_entries(target_dir):
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


def allowlist_entries(folder: Path) -> list[tuple[Path, bytes]]:
    """(file, Z85 public key) for every readable `*.key` in folder (what pyzmq's load_certificates globs)."""
    entries = []
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")) if folder.is_dir() else []:
        try:
            entries.append((path, read_certificate(path)[0]))
        except KeyFileError as exc:
            log.warning("ignoring allowlist entry %s: %s", path, exc)
    return entries

