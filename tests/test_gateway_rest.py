"""The REST door against a real broker: uploads, submit, views, events, and every way in being refused."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile

import pytest

from nsd.protocol import Cmd
from tests.conftest import DIGITS, digits_spec
from tests.gateway_fixtures import LIMITS, OCTETS, TOKEN, read_sse, upload_digits, without_page

pytest.importorskip("fastapi")


async def test_upload_gives_the_same_ref_as_the_python_client(http, client, gateway):
    answer = await http.post("/v1/uploads", params={"name": "recipe.py"}, content=(DIGITS / "recipe.py").read_bytes(), headers=OCTETS)
    assert answer.status_code == 201
    sent = gateway.gateway.uploaded_bytes
    assert sent > 0
    assert answer.json()["ref"] == await client.upload(DIGITS / "recipe.py")
    assert client.uploaded_bytes == 0  # the broker had it already: the same blob, hash for hash
    again = await http.post("/v1/uploads", params={"name": "recipe.py"}, content=(DIGITS / "recipe.py").read_bytes(), headers=OCTETS)
    assert again.json() == answer.json() and gateway.gateway.uploaded_bytes == sent  # not sent a second time


async def test_folder_upload_as_tar_matches_the_python_clients_folder_blob(http, client, tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:  # what `tar -C model -cf - .` sends
        tar.add(folder, arcname=".")
    answer = await http.post("/v1/uploads", params={"name": "model"}, content=body.getvalue(),
                             headers={"Content-Type": "application/x-tar"})
    assert answer.status_code == 201, answer.text
    assert answer.json()["ref"] == await client.upload(folder)


async def test_submit_get_list_cancel_and_logs(http, client):
    spec = await upload_digits(http)
    answer = await http.post("/v1/tasks", json=spec)
    assert answer.status_code == 201, answer.text
    task_id = answer.json()["task_id"]
    view = (await http.get(f"/v1/tasks/{task_id}")).json()
    assert without_page(view) == await client.result(task_id)
    assert view["spec"]["recipe"]["file"] == spec["recipe"]["file"]
    assert [t["task_id"] for t in (await http.get("/v1/tasks")).json()["tasks"]] == [task_id]
    assert (await http.get(f"/v1/tasks/{task_id}/logs")).json() == {"logs": await client.logs(task_id)}
    cancelled = await http.post(f"/v1/tasks/{task_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert (await client.status(task_id))["state"] == "cancelled"
    no_model = await http.get(f"/v1/tasks/{task_id}/artifact")
    assert no_model.status_code == 409 and "no quantized model" in no_model.json()["error"]


async def test_cluster_presets_healthz(http, client):
    assert (await http.get("/v1/cluster")).json() == {"workers": await client.cluster()}
    presets = (await http.get("/v1/presets")).json()["presets"]
    assert {p["name"] for p in presets} >= {"static", "dynamic", "woq", "auto"}
    health = await http.get("/healthz", headers={"Authorization": ""})
    assert health.status_code == 200 and health.json() == {"ok": True}  # without a token: nothing more
    detailed = (await http.get("/healthz")).json()
    assert detailed["ok"] is True and detailed["broker"] and detailed["broker_version"]


async def test_openapi_document_and_docs_are_served(http):
    doc = (await http.get("/openapi.json")).json()
    assert {"/v1/uploads", "/v1/tasks", "/v1/tasks/{task_id}/events", "/task/status/{task_id}"} <= set(doc["paths"])
    docs = await http.get("/docs")
    assert docs.status_code == 200 and "/swagger/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text
    assert (await http.get("/swagger/swagger-ui-bundle.js")).status_code == 200  # served here: works offline


async def test_invalid_spec_is_422_with_every_problem_the_cli_would_list(http):
    from nsd.spec import SpecError, validate

    bad = digits_spec(tolerable_loss=-1, criterion="sideways")
    bad["recipe"]["kind"] = "pythn"
    with pytest.raises(SpecError) as cli:
        validate(bad)
    answer = await http.post("/v1/tasks", json=bad)
    assert answer.status_code == 422
    assert answer.json()["problems"] == cli.value.problems and len(cli.value.problems) >= 3


async def test_paths_instead_of_refs_are_refused_unless_shared(http, broker):
    answer = await http.post("/v1/tasks", json=digits_spec())  # local paths of this machine
    assert answer.status_code == 422
    problems = answer.json()["problems"]
    assert len(problems) == 2 and all("must be a blob reference" in p for p in problems)
    shared = digits_spec()
    shared["model"]["shared"] = True
    assert (await http.post("/v1/tasks", json=shared)).status_code == 201


async def test_ref_to_a_blob_never_uploaded_is_422(http):
    spec = await upload_digits(http)
    spec["model"]["path"] = "nsd-blob:" + "0" * 64 + "/model.pt"
    answer = await http.post("/v1/tasks", json=spec)
    assert answer.status_code == 422 and "not uploaded" in answer.json()["problems"][0]


async def test_body_that_is_not_json_is_422(http):
    answer = await http.post("/v1/tasks", content=b"{nope", headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and "not JSON" in answer.json()["problems"][0]


@pytest.mark.parametrize("path", ["/v1/tasks/nosuchtask", "/v1/tasks/nosuchtask/logs", "/v1/tasks/nosuchtask/events",
                                  "/v1/tasks/nosuchtask/artifact", "/task/status/nosuchtask"])
async def test_unknown_task_is_404(http, path):
    answer = await http.get(path)
    assert answer.status_code == 404 and "no task" in answer.json()["error"]


async def test_cancel_unknown_task_is_404(http):
    assert (await http.post("/v1/tasks/nosuchtask/cancel")).status_code == 404


@pytest.mark.parametrize("method, path", [("GET", "/v1/tasks"), ("POST", "/v1/tasks"), ("GET", "/v1/cluster"),
                                          ("POST", "/v1/uploads?name=x"), ("GET", "/v1/tasks/x/events"),
                                          ("GET", "/ping"), ("GET", "/cluster"), ("GET", "/download/x")])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer"])
async def test_missing_or_wrong_token_is_401(http, method, path, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    if authorization is None:
        del http.headers["Authorization"]
    answer = await http.request(method, path, headers=headers, content=b"{}")
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"


async def test_token_file_is_reread_on_reload(http, gateway):
    gateway.config.tokens.write_text("bob bob-token-0123456789abcdef\n")
    assert (await http.get("/v1/tasks")).status_code == 200  # not re-read until told
    gateway.reload()
    assert (await http.get("/v1/tasks")).status_code == 401
    assert (await http.get("/v1/tasks", headers={"Authorization": "Bearer bob-token-0123456789abcdef"})).status_code == 200
    gateway.config.tokens.write_text("broken line with too many fields\n")
    gateway.reload()  # a broken file keeps the tokens in force
    assert (await http.get("/v1/tasks", headers={"Authorization": "Bearer bob-token-0123456789abcdef"})).status_code == 200


async def test_oversize_spec_body_is_413(http):
    answer = await http.post("/v1/tasks", content=b" " * (LIMITS["max_body"] + 1),
                             headers={"Content-Type": "application/json"})
    assert answer.status_code == 413


async def test_oversize_spec_body_without_length_is_413(http):
    async def chunks():
        for _ in range(LIMITS["max_body"] // 1024 + 2):
            yield b" " * 1024

    answer = await http.post("/v1/tasks", content=chunks(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413


async def test_oversize_upload_is_413_and_nothing_is_stored(http, gateway):
    big = b"x" * (LIMITS["max_upload"] + 1)

    async def chunks():  # chunked: no Content-Length to refuse it by, so the count while spooling must
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    answer = await http.post("/v1/uploads", params={"name": "big.bin"}, content=chunks(), headers=OCTETS)
    assert answer.status_code == 413
    declared = await http.post("/v1/uploads", params={"name": "big.bin"}, content=big, headers=OCTETS)
    assert declared.status_code == 413
    assert gateway.gateway.uploaded_bytes == 0


async def test_body_not_matching_its_sha256_is_refused_and_nothing_is_stored(http, client, tmp_path):
    data = (DIGITS / "recipe.py").read_bytes() + b"# changed in transit\n"
    claimed = hashlib.sha256((DIGITS / "recipe.py").read_bytes()).hexdigest()
    answer = await http.post("/v1/uploads", params={"name": "recipe.py", "sha256": claimed}, content=data, headers=OCTETS)
    assert answer.status_code == 400 and "does not match its sha256" in answer.json()["error"]
    (tmp_path / "recipe.py").write_bytes(data)
    ref = await client.upload(tmp_path / "recipe.py")  # what it would have been stored as
    assert client.uploaded_bytes > 0  # the broker lacked it: the refused body left nothing behind
    good = await http.post("/v1/uploads", params={"name": "recipe.py", "sha256": hashlib.sha256(data).hexdigest()},
                           content=data, headers=OCTETS)
    assert good.status_code == 201 and good.json()["ref"] == ref


async def test_broker_refuses_a_blob_whose_bytes_do_not_match_its_hash(client):
    """The last line of defence behind the gateway: a put whose bytes hash otherwise is not stored."""
    from nsd.client.api import BrokerError

    data = b"not what the hash says"
    sha = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(BrokerError):
        await client.request(Cmd.BLOB_PUT, sha256=sha, offset=0, size=len(data), data=data)
    assert (await client.request(Cmd.BLOB_HAVE, sha256=[sha]))["missing"] == [sha]


def _tar_with(*members: tarfile.TarInfo, data: bytes = b"") -> bytes:
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        for member in members:
            tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return body.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size
    return info


@pytest.mark.parametrize("member, why", [
    (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
    (_member("hard", tarfile.LNKTYPE, "ok.txt"), "not a regular file"),
    (_member("dev", tarfile.CHRTYPE), "not a regular file"),
    (_member("fifo", tarfile.FIFOTYPE), "not a regular file"),
    (_member("../escape.txt"), "outside"),
    (_member("/abs.txt"), "outside"),
])
async def test_hostile_tar_members_are_refused_and_nothing_is_stored(http, gateway, member, why):
    answer = await http.post("/v1/uploads", params={"name": "model"}, content=_tar_with(member),
                             headers={"Content-Type": "application/x-tar"})
    assert answer.status_code == 400 and why in answer.json()["error"], answer.text
    assert gateway.gateway.uploaded_bytes == 0
    good = await http.post("/v1/uploads", params={"name": "model"}, content=_tar_with(),
                           headers={"Content-Type": "application/x-tar"})
    assert good.status_code == 201 and gateway.gateway.uploaded_bytes > 0  # the same tar without it is fine


async def test_body_that_is_not_a_tar_is_400(http):
    answer = await http.post("/v1/uploads", params={"name": "model"}, content=b"plain bytes",
                             headers={"Content-Type": "application/x-tar"})
    assert answer.status_code == 400 and "not a readable tar" in answer.json()["error"]


@pytest.mark.parametrize("name", ["../x", "a/b", ".", "..", ""])
async def test_upload_names_that_are_not_plain_names_are_400(http, name):
    answer = await http.post("/v1/uploads", params={"name": name}, content=b"x", headers=OCTETS)
    assert answer.status_code in (400, 422)


async def test_events_of_an_ended_task_resume_without_repeats(http, client):
    spec = await upload_digits(http)
    task_id = (await http.post("/v1/tasks", json=spec)).json()["task_id"]
    first = await read_sse(http, task_id, stop_after=1)
    assert [e["kind"] for e in first] == ["snapshot"]
    await client.cancel(task_id)
    seq = (await client.status(task_id))["seq"]
    again = await read_sse(http, task_id, last_event_id=first[-1]["seq"])
    assert [(e["kind"], e["seq"]) for e in again] == [("snapshot", seq)]  # it missed the cancel: a newer snapshot
    assert again[0]["task"]["state"] == "cancelled"
    assert await read_sse(http, task_id, last_event_id=seq) == []  # nothing new: nothing sent again
    bad = await http.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "soon"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("Last-Event-ID 'soon' is not an event id")


async def test_quiet_event_streams_carry_keep_alive_comments(http, client):
    spec = digits_spec()
    spec["model"]["shared"] = True
    task_id = await client.submit(spec)  # no worker: it stays queued, and its stream quiet
    lines = []
    async with http.stream("GET", f"/v1/tasks/{task_id}/events") as answer:
        async for line in answer.aiter_lines():
            lines.append(line)
            if lines.count(": keep-alive") == 2:
                break
    assert lines[1] == "event: snapshot"
    assert lines.index(": keep-alive") > lines.index("event: snapshot")


async def test_a_client_that_stops_reading_holds_the_event_stream_back():
    """A slow reader cannot make the gateway buffer events for it: with the reader stalled, the
    gateway takes at most its small queue's worth from the broker's stream, then waits."""
    from nsd.gateway.streams import sse_stream

    pulled = 0

    async def endless():  # an event source that never runs dry, as a busy task's stream
        nonlocal pulled
        while True:
            pulled += 1
            yield {"seq": pulled, "kind": "trial"}
            await asyncio.sleep(0)

    stream = sse_stream(endless(), keepalive_s=60, coalesce_s=0)
    assert bytes(await anext(stream)).startswith(b"id: 1\n")
    await asyncio.sleep(0.5)  # the reader stalls; thousands of events would be ready by now
    assert pulled <= 20, pulled
    assert bytes(await anext(stream)).startswith(b"id: 2\n")  # nothing lost: it resumes in order
    await stream.aclose()


def _tar_bytes(fill) -> bytes:
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w", format=tarfile.PAX_FORMAT) as tar:
        fill(tar)
    return body.getvalue()


def _huge_pax_header(tar) -> None:  # issue 15, attack 6: tarfile would hold the header whole (3.3x the body)
    info = tarfile.TarInfo("ok.txt")
    info.pax_headers = {"comment": "x" * (1 << 20)}
    tar.addfile(info, io.BytesIO(b""))


def _many_empty_members(tar) -> None:  # ... and spends time on each member
    for i in range(LIMITS["max_tar_members"] + 1):
        tar.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))


def _sparse_member(tar) -> None:
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    tar.addfile(info)


def _control_character_name(tar) -> None:
    tar.addfile(tarfile.TarInfo("evil\x1b[2Jname.txt"), io.BytesIO(b""))


@pytest.mark.parametrize("fill, why", [
    (_huge_pax_header, "extended header"),
    (_many_empty_members, f"more than {LIMITS['max_tar_members']} entries"),
    (_sparse_member, "sparse"),
    (_control_character_name, "control character"),
])
async def test_tar_headers_and_members_are_bounded(http, gateway, fill, why):
    answer = await http.post("/v1/uploads", params={"name": "model"}, content=_tar_bytes(fill),
                             headers={"Content-Type": "application/x-tar"})
    assert answer.status_code == 400 and why in answer.json()["error"], answer.text
    assert gateway.gateway.uploaded_bytes == 0


@pytest.mark.parametrize("name", ["re\ncipe.py", "tab\tname", "bell\x07", "del\x7f"])
async def test_upload_names_with_control_characters_are_refused(http, name):
    answer = await http.post("/v1/uploads", params={"name": name}, content=b"x", headers=OCTETS)
    assert answer.status_code == 400 and "control characters" in answer.json()["error"]


async def test_refs_with_control_characters_are_not_refs(http):
    from nsd.blobs import parse_ref

    ref = "nsd-blob:" + "a" * 64 + "/model\x1b[31m.pt"
    assert parse_ref(ref) is None
    spec = digits_spec()
    spec["model"]["path"] = ref
    answer = await http.post("/v1/tasks", json=spec)
    assert answer.status_code == 422 and any("must be a blob reference" in p for p in answer.json()["problems"])


async def test_events_close_together_share_one_write():
    """Each write costs the gateway's one loop more than its bytes: events arriving within the coalescing
    window go out as one chunk, in order, each still its own SSE event."""
    from nsd.gateway.streams import sse_stream

    async def burst():
        for seq in range(1, 6):
            yield {"seq": seq, "kind": "trial"}
            await asyncio.sleep(0.01)
        await asyncio.sleep(60)

    stream = sse_stream(burst(), keepalive_s=60, coalesce_s=0.5)
    chunk = bytes(await anext(stream))
    assert [line for line in chunk.decode().splitlines() if line.startswith("id: ")] == [f"id: {i}" for i in range(1, 6)]
    await stream.aclose()
