"""Who is asking, and for which tenant (README "Privacy"). Pure: no sockets, no I/O.

A *tenant* is a name: the file name of a client key in the broker's allowlist (`alice` for
`KEYS_DIR/clients/alice.key`), or a gateway token's name. Every task, uploaded blob, artifact, log, event
and cached metric belongs to one tenant, and a tenant sees only its own. The broker learns who sent a
message from the connection's CURVE User-Id, which its ZAP handler sets at the handshake
(`nsd.security`): `client:NAME`, `gateway:NAME` or `admin:NAME` on the client and event sockets. Without
CURVE (loopback development) there is no User-Id, and everything is the one tenant `""`, as it was before
tenants existed.

- a *client* key acts for its own tenant only; a `tenant` field it sends is refused unless it names itself;
- a *gateway* key acts for the tenant each request names (`tenant`, the token's name); it is trusted to
  have authenticated that user, and to forward the token's right to run code (`code`);
- an *admin* key sees every tenant's tasks, blobs and the audit log; it submits as its own tenant;
- without CURVE the one anonymous principal sees everything (there is nobody else); a tenant it names
  only labels what it creates (a gateway in loopback development), since no credential stands behind it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Tenant names on the wire: key file names and gateway token names (an e-mail address fits).
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
ROLES_ON_CLIENT_SOCKET = ("client", "gateway", "admin")
DEV = "dev"  # the role of every peer of a broker without CURVE


class Refused(ValueError):
    """A request its key may not make (audited: README "Privacy")."""


class RefusedTenant(Refused):
    """A request names a tenant its key may not act for."""


@dataclass(frozen=True)
class Principal:
    """A connection's identity: its role, its key's name, and whether its allowlist entry says `code`."""

    role: str  # client | gateway | admin | dev
    name: str  # the key's name ("" without CURVE)
    code: bool = False  # may submit python recipes (a gateway: may forward that right for its users)

    @property
    def sees_all(self) -> bool:
        """Admins, and the single principal of a broker without CURVE, see every tenant."""
        return self.role in ("admin", DEV)

    def __str__(self) -> str:
        return DEV if self.role == DEV else f"{self.role}:{self.name}"


ANONYMOUS = Principal(DEV, "", code=True)


def user_id(role: str, name: str, code: bool) -> str:
    """The ZAP User-Id the broker's handler gives a client-socket key (parsed back by `principal`)."""
    return f"{role}:{name}" + (":code" if code else "")


def principal(user: str | None) -> Principal:
    """The principal behind a connection's User-Id; no User-Id (no CURVE) is the anonymous one. A User-Id
    this module did not make (a worker key's, which cannot reach the client socket) gets nothing."""
    if user is None:
        return ANONYMOUS
    role, _, rest = user.partition(":")
    name, _, flag = rest.partition(":")
    if role not in ROLES_ON_CLIENT_SOCKET or not TENANT.fullmatch(name) or flag not in ("", "code"):
        return Principal("client", "\x00unknown")  # no tenant can have this name: it owns and sees nothing
    return Principal(role, name, code=flag == "code")


@dataclass(frozen=True)
class Acting:
    """What one request may do: for which tenant, whether it may see other tenants', run code."""

    who: Principal
    tenant: str
    code: bool

    @property
    def sees_all(self) -> bool:
        return self.who.sees_all

    def sees(self, owner: str) -> bool:
        return self.sees_all or owner == self.tenant

    @property
    def actor(self) -> str:
        """For the audit log: the key, and the tenant it acted for when that is another name."""
        return str(self.who) if self.tenant == self.who.name else f"{self.who} for {self.tenant}"


def acting(who: Principal, body: dict) -> Acting:
    """The tenant a request acts for (its checked optional `tenant` and `code` fields): a gateway's may
    name any tenant; a client's or admin's only itself (RefusedTenant otherwise)."""
    asked = body.get("tenant")
    if who.role == DEV:  # no CURVE: nothing to check a name against, and it sees everything anyway
        return Acting(who, who.name if asked is None else asked, code=True)
    if who.role == "gateway":
        tenant = who.name if asked is None else asked
        return Acting(who, tenant, code=who.code and body.get("code") is True)
    if asked is not None and asked != who.name:
        raise RefusedTenant(f"this {who.role} key may act only for itself: only a key allowed with "
                            f"`nsd keys allow --role gateway` may name another tenant")
    return Acting(who, who.name, code=who.code)
