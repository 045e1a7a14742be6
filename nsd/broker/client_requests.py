"""The broker's answers to client requests, one loop turn's part (nsd/broker/daemon.py): each request in
a savepoint of the turn's transaction, its answer (or why it was refused) sent after the commit. Each is
answered for the tenant it acts for (`nsd.tenants`, `nsd.broker.tenancy`): another tenant's task or blob
gets the answer an unknown one gets; refusals are audited.

Also the event socket's subscriptions: each is granted only for a task its subscriber may see.

A part of `Broker`, which supplies the core, the blob store, the SQLite store, the endpoints and sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import zmq

from nsd import __version__
from nsd.broker.metric_cache import tenant_scope
from nsd.broker.store import StorageError
from nsd.broker.tenancy import no_blob
from nsd.protocol import DEFAULT_PAGE, MAX_CHUNK_BYTES, PROTOCOL_VERSION, Cmd, Message
from nsd.spec import SpecError, validate
from nsd.tenants import Acting, Principal, Refused, acting, principal

NOBODY = Principal("client", "\x00unknown")  # a CURVE connection without a User-Id (never): sees nothing

log = logging.getLogger("nsd.broker")


class ClientRequests:
    """Broker's client side: `_client_message` answers one checked request."""

    def _client_message(self, identity: bytes, key: str | None, msg: Message) -> tuple[bytes, Cmd, dict]:
        req = msg.body["req"]
        who = self._principal(key)
        try:
            with self.core.tx():  # a savepoint: a request that fails leaves nothing behind
                answer = self._client_request(identity, acting(who, msg.body), msg)
        except StorageError:
            raise
        except Refused as exc:  # what a key tried and may not do is audited (after the rollback)
            with self.core.tx():
                self.core.audit(Acting(who, who.name, False), "refused", detail=f"{msg.cmd.name}: {exc}"[:500],
                                tenant=msg.body.get("tenant", who.name))
            return identity, Cmd.ERROR, {"req": req, "error": str(exc)}
        except (SpecError, LookupError, ValueError) as exc:
            return identity, Cmd.ERROR, {"req": req, "error": str(exc)}
        except Exception:
            log.exception("request %s failed", msg.cmd.name)
            return identity, Cmd.ERROR, {"req": req, "error": "internal broker error (see its log)"}
        return identity, Cmd.REPLY, {"req": req, **answer}

    def _principal(self, user: str | None) -> Principal:
        """Who sent a client-socket message (its User-Id): under CURVE every connection has one."""
        if self.curve is not None and user is None:
            return NOBODY
        return principal(user)

    def _client_request(self, identity: bytes, who: Acting, msg: Message) -> dict[str, Any]:
        body, core = msg.body, self.core
        if msg.cmd is Cmd.HELLO:
            return {"protocol": PROTOCOL_VERSION, "version": __version__, "events": self.endpoints["events"],
                    "you": {"role": who.who.role, "name": who.who.name, "tenant": who.tenant, "code": who.code}}
        if msg.cmd is Cmd.SUBMIT:
            return self._submit(who, body["spec"], body.get("submit_id"))
        if msg.cmd is Cmd.BLOB_HAVE:
            return {"missing": [h for h in body["sha256"] if not core.owns_blob(who, h)]}
        if msg.cmd is Cmd.BLOB_PUT:
            return self._blob_put(identity, who, body)
        if msg.cmd is Cmd.BLOB_GET:
            if not core.owns_blob(who, body["sha256"]):
                raise no_blob(body["sha256"])
            data, size = self.blobs.read(body["sha256"], body["offset"], body["length"])
            if body["offset"] == 0:
                artifact = next((t for t in core.visible(who) if t.artifact and body["sha256"] in t.artifact), None)
                core.audit(who, "download", artifact, body["sha256"][:12])
            return {"data": data, "size": size}
        if msg.cmd is Cmd.LIST:
            return {"tasks": [{**t.summary(), "owner": t.owner} for t in core.visible(who)]}
        if msg.cmd is Cmd.CLUSTER:
            return {"workers": self._cluster(who), **({"pair": self.pair.status()} if self.pair is not None else {})}
        if msg.cmd is Cmd.AUDIT:
            if not who.sees_all:
                raise Refused("the audit log is for admin keys (`nsd keys allow --role admin KEY`)")
            return {"entries": self.store.audit_log(body.get("owner"), body.get("task_id"), body.get("before"),
                                                    body.get("limit", 100))}
        if msg.cmd is Cmd.CACHE_PURGE:
            return self._cache_purge(who, body)
        task = core.find_for(who, body["task_id"])
        if msg.cmd in (Cmd.STATUS, Cmd.RESULT_GET):
            offset = body.get("offset", 0)
            if msg.cmd is Cmd.RESULT_GET and offset == 0:
                core.audit(who, "result", task)
            return {"task": task.public(offset, body.get("limit", DEFAULT_PAGE))}
        if msg.cmd is Cmd.LOGS:
            core.audit(who, "logs", task, body.get("job"))
            return {"logs": self._logs(task.id, body.get("job"))}
        if msg.cmd is Cmd.CANCEL_TASK:
            core.audit(who, "cancel", task)
            core.cancel(task)
            return {"task": task.summary()}
        if msg.cmd is Cmd.DELETE_TASK:
            core.audit(who, "delete", task, task.name[:200])
            return {"task_id": task.id, "blobs_dropped": len(core.delete_task(task))}
        raise ValueError(f"unhandled request {msg.cmd.name}")  # pragma: no cover - CLIENT_TO_BROKER is exhaustive

    def _submit(self, who: Acting, raw: dict, submit_id: str | None = None) -> dict[str, Any]:
        """A spec, checked as every door checks it, naming only its tenant's blobs; python recipes need the
        code right (README "Privacy")."""
        spec = validate(raw)
        if spec.recipe.kind == "python" and not who.code:
            raise Refused(f"tenant {who.tenant!r} may not submit python recipes (code that workers run): the "
                          f"broker's operator allows it with `nsd keys allow --role client KEY --code`; "
                          f"built-in recipes need no such right")
        missing = self.core.unowned_refs(who, spec)
        if missing:
            raise ValueError(f"blob(s) not uploaded: {', '.join(missing)}; upload them first (BLOB_PUT)")
        task = self.core.tasks[self.core.submit(spec, owner=who.tenant, submit_id=submit_id)]
        self.core.audit(who, "submit", task, task.name[:200])
        return {"task_id": task.id}

    def _blob_put(self, identity: bytes, who: Acting, body: dict) -> dict[str, Any]:
        """One chunk of an upload. Bytes its tenant does not own are taken whole and checked, even where the
        broker holds them already: an upload never tells one tenant what another has uploaded."""
        sha, known = body["sha256"], self.core.owns_blob(who, body["sha256"])
        uploader = identity + b"\x00" + who.tenant.encode()  # a gateway uploads for many tenants
        offset, complete = self.blobs.write(uploader, sha, body["offset"], body["size"], body["data"], known=known)
        if complete and not known:
            self.core.add_owner(sha, who.tenant)
        return {"offset": offset, "complete": complete}

    def _cluster(self, who: Acting) -> list[dict]:
        """Workers; what they run is shown only where the tasks are the asker's."""
        now, workers = time.time(), []
        for worker in self.core.workers.values():
            view = worker.public(now)
            if not who.sees_all:
                view["running"] = [j for j in view["running"] if (t := self.core.tasks.get(j[:12])) and who.sees(t.owner)]
            workers.append(view)
        return workers

    def _cache_purge(self, who: Acting, body: dict) -> dict[str, Any]:
        given = [k for k in ("task_id", "worker", "all") if body.get(k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("purge the cache entries of one task (task_id), of one worker (worker), or all")
        if given == ["task_id"]:
            task = self.core.find_for(who, body["task_id"])
            purged = self.store.cache_purge(task_id=task.id)
        elif not who.sees_all and given == ["worker"]:
            raise Refused("purging a worker's cache entries is for admin keys (`nsd keys allow --role admin KEY`)")
        elif given == ["worker"]:
            purged = self.store.cache_purge(worker=body["worker"])
        else:  # all: an admin's is the whole cache, a tenant's its own entries
            purged = self.store.cache_purge() if who.sees_all else self.store.cache_purge(scope=tenant_scope(who.tenant))
        self.core.audit(who, "cache purge", self.core.tasks.get(body.get("task_id") or ""),
                        f"{given[0]}={body[given[0]]}; {purged} entries")
        return {"purged": purged}

    async def _drain_subscriptions(self) -> None:
        """Decide each subscription (XPUB_MANUAL): granted only for a whole task id its peer may see
        (`Core.may_subscribe`, by the User-Id libzmq attaches to the subscription message). A grant applies
        to the peer whose message was read last, so each is decided before the next is read."""
        shadow, readable = self._shadows["events"], self._readable["events"]
        while True:
            await readable.wait()
            with contextlib.suppress(zmq.Again):
                for _ in range(self.limits.batch):  # then let the other loops run: a flood starves nothing
                    frame = shadow.recv(zmq.NOBLOCK, copy=False)
                    message = frame.bytes
                    if message[:1] == b"\x00":  # an unsubscription (the peer's own, or its pipe closing)
                        with contextlib.suppress(zmq.ZMQError):  # its peer may be gone already
                            shadow.setsockopt(zmq.UNSUBSCRIBE, message[1:])
                        continue
                    try:
                        user = frame.get("User-Id") if self.curve is not None else None
                    except zmq.ZMQError:
                        user = None
                    if message[:1] == b"\x01" and self.core.may_subscribe(self._principal(user), message[1:]):
                        with contextlib.suppress(zmq.ZMQError):
                            shadow.setsockopt(zmq.SUBSCRIBE, message[1:])
            await asyncio.sleep(0)

    def _logs(self, task_id: str, job: str | None) -> list[dict]:
        """A task's job logs; the oldest are cut so that the reply fits one message (ask per job for those)."""
        logs, budget = self.store.logs(task_id, job), MAX_CHUNK_BYTES * 3
        for entry in reversed(logs):
            budget -= len(entry["text"].encode()) + 256
            if budget < 0:
                entry["text"], entry["cut"] = "[cut: this reply holds at most 12 MiB of logs; ask for this job alone]", True
        return logs
