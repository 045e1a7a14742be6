"""nsd.tenants: who acts for which tenant, decided over plain data (no sockets)."""

from __future__ import annotations

import pytest

from nsd.tenants import ANONYMOUS, Principal, RefusedTenant, acting, principal, user_id


def test_user_ids_round_trip_and_anything_else_owns_nothing():
    assert principal(user_id("client", "alice", False)) == Principal("client", "alice", False)
    assert principal(user_id("gateway", "gw", True)) == Principal("gateway", "gw", True)
    assert principal(None) is ANONYMOUS and ANONYMOUS.sees_all
    for forged in ("worker:node1", "client:../x", "client:alice:root", "admin", "rOoT:alice", "client::code"):
        who = principal(forged)
        assert not who.sees_all and not acting(who, {}).sees("") and not acting(who, {}).sees("alice")


def test_only_a_gateway_names_another_tenant_and_code_needs_both_rights():
    alice, gw, gw0, root = (Principal("client", "alice", True), Principal("gateway", "gw", True),
                            Principal("gateway", "gw0", False), Principal("admin", "root", False))
    assert acting(alice, {}).tenant == "alice" and acting(alice, {"tenant": "alice"}).code
    for who in (alice, root):
        with pytest.raises(RefusedTenant):
            acting(who, {"tenant": "bob"})
    assert acting(gw, {"tenant": "bob"}).tenant == "bob" and not acting(gw, {"tenant": "bob"}).code
    assert acting(gw, {"tenant": "bob", "code": True}).code and not acting(gw0, {"tenant": "bob", "code": True}).code
    assert acting(gw, {}).tenant == "gw"  # no tenant named: its own
    assert acting(root, {}).sees("bob") and not acting(gw, {"tenant": "bob"}).sees("alice")
    assert acting(gw, {"tenant": "bob"}).actor == "gateway:gw for bob" and acting(alice, {}).actor == "client:alice"


def test_without_curve_everything_is_one_tenant_and_a_named_one_only_labels():
    dev = acting(ANONYMOUS, {"tenant": "alice"})
    assert dev.tenant == "alice" and dev.code and dev.sees("bob") and dev.sees("")
    assert acting(ANONYMOUS, {}).tenant == ""
