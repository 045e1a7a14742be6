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
results other tenants may reuse when the broker shares its metric cache). The ZAP handler names each
connection by its entry: the broker reads who sent a message from its User-Id (`server.py`).

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

Two libzmq behaviours this package guards against:

* A CURVE server with no ZAP handler in its context accepts *every* client key (RFC 26's "legacy"
  mode): only encryption, no authentication. `apply` sets ZMQ_ZAP_ENFORCE_DOMAIN so a socket whose
  handler is missing (not started yet, or already stopped) refuses every peer instead.
* ZAP runs once per connection, at the handshake. A reload (or a revoked key) affects new connections
  only; connections already authenticated stay up until they drop or the broker restarts.

Its parts: key files and allowlists (`keys.py`, also what `nsd keys` does), the broker's ZAP handler
(`server.py`), and the worker's and client's side (`client.py`). Each side's checks mirror the other's.
"""

from nsd.security.client import ClientKeys, HandshakeWatch, apply_client
from nsd.security.keys import (FLAGS, PUBLIC_SUFFIX, ROLE_DOMAINS, ROLE_FOLDERS, ROLES, SECRET_SUFFIX, KeyFileError,
                               allow, allowlist_dir, default_key_dir, default_keys_dir, generate_keypair, list_keys,
                               read_certificate, read_flags, revoke)
from nsd.security.server import SOCKET_DOMAINS, CurveServer

__all__ = ["FLAGS", "PUBLIC_SUFFIX", "ROLES", "ROLE_DOMAINS", "ROLE_FOLDERS", "read_flags", "SECRET_SUFFIX", "SOCKET_DOMAINS", "ClientKeys", "CurveServer",
           "HandshakeWatch", "KeyFileError", "allow", "allowlist_dir", "apply_client", "default_key_dir",
           "default_keys_dir", "generate_keypair", "list_keys", "read_certificate", "revoke"]
