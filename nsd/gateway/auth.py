"""Bearer tokens: a file of `name token` lines, re-read on SIGHUP (`systemctl reload nsd-gateway`)."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

log = logging.getLogger("nsd.gateway")


class TokenFileError(ValueError):
    pass


def read_tokens(path: Path) -> dict[str, str]:
    """token -> name. Blank lines and `#` comments are skipped; a malformed line is an error, not a skip,
    so that a typo cannot silently lock someone out or leave a token half-parsed."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenFileError(f"{path}:{number}: expected `name token`")
        name, token = parts
        if len(token) < 16:
            raise TokenFileError(f"{path}:{number}: token for {name!r} is shorter than 16 characters")
        if token in tokens:
            raise TokenFileError(f"{path}:{number}: token for {name!r} is also {tokens[token]!r}'s")
        tokens[token] = name
    return tokens


class Tokens:
    """Who a bearer token belongs to. Without a file, every request is let in (loopback use)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self._tokens: dict[str, str] = read_tokens(self.path) if self.path else {}

    @property
    def required(self) -> bool:
        return self.path is not None

    def reload(self) -> None:
        """Re-read the file; a broken file keeps the old tokens (and says so) rather than locking all out."""
        if self.path is None:
            return
        try:
            self._tokens = read_tokens(self.path)
            log.info("gateway: %d token(s) loaded from %s", len(self._tokens), self.path)
        except TokenFileError as exc:
            log.error("gateway: keeping the old tokens: %s", exc)

    def who(self, authorization: str | None) -> str | None:
        """The token's owner for an `Authorization: Bearer <token>` value; None when not allowed."""
        if not self.required:
            return "anonymous"
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        token = token.strip().encode()
        for known, name in self._tokens.items():
            if hmac.compare_digest(known.encode(), token):  # no early exit on the first wrong byte
                return name
        return None
