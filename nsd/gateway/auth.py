"""Bearer tokens: a file of `name token [code]` lines, re-read on SIGHUP (`systemctl reload nsd-gateway`).

A token's name is its tenant (README "Privacy"): the gateway acts for that tenant at the broker, and a
key named `alice` and a token named `alice` are the same tenant. `code` lets the token submit python
recipes (code that runs on the workers); built-in recipes need no such right.
"""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nsd.gateway")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")  # a tenant (nsd.tenants.TENANT): a key or token name


class TokenFileError(ValueError):
    pass


@dataclass(frozen=True)
class Caller:
    """Who a request comes from."""

    tenant: str  # the token's name; "" without tokens (--no-auth: one tenant, as a broker without CURVE)
    code: bool  # may submit python recipes


ANONYMOUS = Caller("", code=True)  # --no-auth is loopback development: everything, as the broker's own CLI


def read_tokens(path: Path) -> dict[str, Caller]:
    """token -> Caller. Blank lines and `#` comments are skipped; a malformed line is an error, not a skip,
    so that a typo cannot silently lock someone out, grant a right, or leave a token half-parsed."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    tokens: dict[str, Caller] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "code"):
            raise TokenFileError(f"{path}:{number}: expected `name token` or `name token code`")
        name, token = parts[:2]
        if not NAME.match(name):
            raise TokenFileError(f"{path}:{number}: name {name[:70]!r} is not a tenant name "
                                 "(letters, digits and . _ @ + -; at most 64)")
        if len(token) < 16:
            raise TokenFileError(f"{path}:{number}: token for {name!r} is shorter than 16 characters")
        if token in tokens:
            raise TokenFileError(f"{path}:{number}: token for {name!r} is also {tokens[token].tenant!r}'s")
        tokens[token] = Caller(name, code=len(parts) == 3)
    return tokens


class Tokens:
    """Who a bearer token belongs to. Without a file every request is the one anonymous caller: only for
    `--no-auth` (the server refuses to start that way unless told, and only on loopback)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self._tokens: dict[str, Caller] = read_tokens(self.path) if self.path else {}

    @property
    def required(self) -> bool:
        return self.path is not None

    @property
    def tenants(self) -> set[str]:
        return {caller.tenant for caller in self._tokens.values()}

    def reload(self) -> None:
        """Re-read the file; a broken file keeps the old tokens (and says so) rather than locking all out."""
        if self.path is None:
            return
        try:
            self._tokens = read_tokens(self.path)
            log.info("gateway: %d token(s) loaded from %s", len(self._tokens), self.path)
        except TokenFileError as exc:
            log.error("gateway: keeping the old tokens: %s", exc)

    def who(self, authorization: str | None) -> Caller | None:
        """The caller for an `Authorization: Bearer <token>` value; None when not allowed."""
        if not self.required:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        token = token.strip().encode()
        found = None
        for known, caller in self._tokens.items():
            if hmac.compare_digest(known.encode(), token):  # no early exit on the first wrong byte
                found = caller
        return found
