"""What the worker checks in every broker message before acting on it, and in every runner answer before
passing it on. Pure: no sockets, no I/O.

`nsd.protocol.unpack` already checks each body's required fields and their msgpack types; these
functions check their values (an id that could name a path, a negative offset, a chunk that does not
fit its blob, a job whose spec is not one the broker would have accepted). Each returns None when the
message is usable, else a reason a person can read: the daemon logs it and ignores the message. A
runner runs a recipe's code, so its answers are checked the same way (`runner_answer`, `result`).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from nsd.blobs import CHUNK_BYTES, is_sha256, parse_ref
from nsd.protocol import (BOOL, FIGURES, JOB_ID, JOB_KINDS, MAX_ATTEMPT, MAX_BODY, OUTBOX_ENTRY, RESULT_OPTIONAL,
                          Cmd, parse_job_id, text)
from nsd.spec import FIGURE_OBJECTIVES, SpecError, validate
from nsd.worker.sandbox import under

# A lease's job id is protocol.JOB_ID ("<12 hex>/<kind>", "<12 hex>/<trial index>", "<12 hex>/<kind>/<index>"):
# the task id becomes a folder name under the worker's logs, so nothing that could leave that folder is
# accepted. What each kind carries is protocol.JOB_KINDS.
MAX_JOB_CORES = 4096  # the spec's bound on cores_per_trial; the daemon clamps a job to its own cores


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def lease(trial_id: Any, attempt: Any) -> str | None:
    """A (trial_id, attempt) pair as ASSIGN, CANCEL and RESULT_ACK carry it."""
    if not isinstance(trial_id, str) or not JOB_ID.fullmatch(trial_id):
        return f"malformed trial id {str(trial_id)[:80]!r}"
    if not _int(attempt) or not 1 <= attempt <= MAX_ATTEMPT:
        return f"malformed attempt {str(attempt)[:20]!r}"
    return None


def job(trial_id: str, body: Any) -> str | None:
    """An ASSIGN's job, for a lease already checked: its kind matches the id, its spec validates as
    the broker validates a submitted one (so, with model.shared = false, only blob references), its
    cores are a sane count."""
    if not isinstance(body, dict):
        return "job is not a map"
    task_id, ref = parse_job_id(trial_id)
    kind = JOB_KINDS[ref.kind]
    if body.get("kind") != kind.name:
        return f"job kind {str(body.get('kind'))[:20]!r} does not match {trial_id}"
    if body.get("task_id") != task_id:
        return f"job task id does not match {trial_id}"
    if kind.per_trial and body.get("index") != ref.index:
        return f"job index does not match {trial_id}"
    if kind.config and not _int(body.get("index")):
        return f"{kind.name} job without its trial's index"
    if kind.config and (not isinstance(body.get("config"), dict) or len(body["config"]) != 1):
        return "job config must map one INC config name to its parameters"
    if kind.name == "baseline" and not (isinstance(body.get("families"), dict) and len(body["families"]) <= 64
                                        and all(isinstance(c, dict) and len(c) == 1 and next(iter(c)) == f
                                                for f, c in body["families"].items())):
        return "baseline job families must map each INC config name to one config of it"
    if kind.name == "verify" and parse_ref(body.get("artifact")) is None:  # becomes a path in the blob cache
        return "verify job without a blob reference to the saved model"
    problem = _perf_fields(body)
    if problem:
        return problem
    cores = body.get("cores")
    if cores is not None and (not _int(cores) or not 1 <= cores <= MAX_JOB_CORES):
        return f"job cores {str(cores)[:20]!r} is not between 1 and {MAX_JOB_CORES}"
    try:
        validate(body.get("spec"))
    except SpecError as exc:
        return f"job spec: {'; '.join(exc.problems)[:500]}"
    except Exception as exc:  # a value validate() never expected: refuse it rather than fail here
        return f"job spec: {type(exc).__name__}"
    for section in ("model", "recipe", "tuning"):  # validate() fills missing ones in; the worker reads them
        if not isinstance(body["spec"].get(section), dict):
            return f"job spec has no {section} section"
    return None


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def rule(value: Any) -> str | None:
    """A trial's early-stop rule (in its ASSIGN, or a RULE that comes while it runs)."""
    if not (isinstance(value, dict) and value.get("sign") in (1, -1) and _number(value.get("need"))
            and isinstance(value.get("stop", True), bool)):
        return "job rule must be {sign: 1 or -1, need: number, stop: optional bool}"
    return None


def _perf_fields(body: dict) -> str | None:
    """A trial's stop rule and keep flag, a save job's kept folder (issue 11)."""
    if body.get("rule") is not None and (why := rule(body["rule"])) is not None:
        return why
    if body.get("keep") is not None and not isinstance(body.get("keep"), bool):
        return "job keep must be a boolean"
    if body.get("kept") is not None and not (isinstance(body["kept"], str) and len(body["kept"]) < 4096):
        return "job kept must be a path"
    return _prune(body.get("prune"))


def _prune(prune: Any) -> str | None:
    """A trial's `prune`: the figures to beat before it is evaluated (nsd.figures.loses)."""
    if prune is None:
        return None
    objective = prune.get("objective") if isinstance(prune, dict) else None
    if not (isinstance(prune, dict) and set(prune) == {"objective", "best", "margin", "baseline"}
            and (objective in FIGURE_OBJECTIVES or (isinstance(objective, dict) and objective
                                                    and all(k in FIGURE_OBJECTIVES and _number(w) and w > 0
                                                            for k, w in objective.items())))
            and _number(prune["best"]) and _number(prune["margin"]) and 0 <= prune["margin"] <= 1
            and (prune["baseline"] is None or FIGURES.ok(prune["baseline"]))):
        return "job prune must be {objective: a figure or weights, best: number, margin: 0..1, baseline: figures}"
    return None


def chunk(body: dict, max_size: int) -> str | None:
    """A CHUNK reply (to a FETCH this worker sent): a blob name, and either an error or data that fits
    the blob's declared size at its offset. `max_size` bounds the declared size (the cache's size)."""
    if not is_sha256(body.get("sha256")):
        return "chunk for a blob name that is not a sha256"
    offset = body.get("offset")
    if not _int(offset) or offset < 0:
        return f"chunk offset {str(offset)[:20]!r} is not a non-negative integer"
    if "error" in body:
        return None if isinstance(body["error"], str) else "chunk error is not a string"
    data, size = body.get("data"), body.get("size")
    if not isinstance(data, bytes) or not _int(size):
        return "chunk without bytes data and an integer size"
    if not 0 <= size <= max_size:
        return f"blob size {size} is over this worker's cache size ({max_size} bytes)"
    if len(data) != min(CHUNK_BYTES, max(0, size - offset)):
        return f"chunk of {len(data)} bytes at offset {offset} does not fit a {size}-byte blob"
    return None


def store_ack(body: dict) -> str | None:
    if not is_sha256(body.get("sha256")):
        return "store ack for a blob name that is not a sha256"
    if not _int(body.get("offset")) or body["offset"] < 0:
        return "store ack offset is not a non-negative integer"
    if "error" in body and not isinstance(body["error"], str):
        return "store ack error is not a string"
    if "complete" in body and not isinstance(body["complete"], bool):
        return "store ack 'complete' is not true or false"
    return None


def disconnect(body: dict) -> str | None:
    if "fatal" in body and not isinstance(body["fatal"], bool):
        return "disconnect 'fatal' is not true or false"
    return None


# What a runner's answer may hold: a result's fields, less those only the worker sets (a runner asking for
# a requeue would get its trial run again and again), and the folder a save job made.
RUNNER_FIELDS = {**{k: c for k, c in RESULT_OPTIONAL.items() if k not in ("requeue", "handback", "artifact", "log")},
                 "ok": BOOL, "artifact_dir": text(4096)}


def runner_answer(answer: Any) -> dict:
    """A runner's answer, checked like a peer's message: a runner runs a recipe's code, which may have
    replaced ours. Fields a result does not carry, or of the wrong type, are dropped (and named in the
    error); an answer without a boolean `ok` is a failure."""
    if not isinstance(answer, dict):
        return {"ok": False, "error": "the runner's answer is not a map"}
    clean = {k: v for k, v in answer.items() if k in RUNNER_FIELDS and RUNNER_FIELDS[k].ok(v)}
    dropped = sorted(str(k)[:40] for k in answer if k not in clean)
    if "ok" not in clean:
        clean = {"ok": False, "error": "the runner's answer has no ok: true or false"}
    if dropped:
        clean["error"] = (f"{clean.get('error') or ''} (dropped from the runner's answer: "
                          f"{', '.join(dropped[:20])})").strip()[:2000]
    return clean


def result(body: dict) -> dict:
    """A RESULT as the broker will check it (and READY's outbox will carry it): one that would be refused
    there, whatever a runner put in it, becomes a plain failure, so that no answer can keep this worker
    from registering again."""
    problem = None if OUTBOX_ENTRY.ok(body) else "a field of the wrong type"
    if problem is None and len(msgpack.packb(body, use_bin_type=True)) > MAX_BODY[Cmd.RESULT] - 4096:
        problem = "over the size of a result"
    if problem is None:
        return body
    return {key: body[key] for key in ("trial_id", "attempt", "worker_id")} | {
        "ok": False, "error": f"the job's answer could not be sent: {problem}"}


def shared_paths(paths: dict[str, str], shared_dirs: list[str]) -> str | None:
    """A model.shared task's paths ({field: path with links resolved}) against the folders this worker's
    runners may read: None when each is inside one, else why not."""
    for name, path in paths.items():
        if not any(under(path, d) for d in shared_dirs):
            where = ", ".join(shared_dirs) if shared_dirs else "none; see nsd worker --shared-dir"
            return f"{name} {path} is not in a folder this worker shares with its runners ({where})"
    return None
