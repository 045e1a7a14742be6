"""Blobs: deterministic packing, safe unpacking, chunked upload with dedup and hash checks, the worker
cache's LRU eviction — over real sockets where a broker is involved."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from nsd.blobs import make_ref, pack_tree, parse_ref, unpack_tree
from nsd.client.api import BrokerError
from nsd.protocol import Cmd
from nsd.worker.cache import BlobCache


def make_tree(root, big: int = 0):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(os.urandom(big) if big else b"beta")
    return root


def test_packing_is_deterministic_and_round_trips(tmp_path):
    tree = make_tree(tmp_path / "model")
    first, second = io.BytesIO(), io.BytesIO()
    pack_tree(tree, first)
    os.utime(tree / "a.txt", (1, 1))  # times do not change the blob
    pack_tree(tree, second)
    assert first.getvalue() == second.getvalue()
    (tmp_path / "blob.tar").write_bytes(first.getvalue())
    unpack_tree(tmp_path / "blob.tar", tmp_path / "out")
    assert (tmp_path / "out" / "model" / "sub" / "b.bin").read_bytes() == b"beta"


def test_unpack_refuses_members_escaping_their_folder(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(tarfile.FilterError, match="outside the destination"):
        unpack_tree(evil, tmp_path / "dest" / "x")
    assert not (tmp_path / "dest" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("m")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="not a file or folder"):
        unpack_tree(link, tmp_path / "dest2")


def test_references():
    sha = "a" * 64
    assert parse_ref(make_ref(sha, "model")) == (sha, "model")
    for bad in ("/abs/path", f"nsd-blob:{sha}/..", f"nsd-blob:{sha[:-1]}/m", f"nsd-blob:{sha}/a/b", 5):
        assert parse_ref(bad) is None


async def test_upload_is_chunked_and_deduplicated(broker, client, tmp_path):
    tree = make_tree(tmp_path / "model", big=3 * 1024 * 1024 + 123)  # several 1 MiB chunks
    ref = await client.upload(tree)
    sent = client.uploaded_bytes
    assert sent > 3 * 1024 * 1024
    assert await client.upload(tree) == ref and client.uploaded_bytes == sent  # nothing sent the second time
    sha, name = parse_ref(ref)
    assert broker.blobs.has(sha) and name == "model"
    await client.download(sha, tmp_path / "back.tar")
    unpack_tree(tmp_path / "back.tar", tmp_path / "back")
    assert (tmp_path / "back" / "model" / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()


async def test_hash_mismatch_and_out_of_order_chunks_are_refused(broker, client):
    data = b"some model bytes"
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(BrokerError, match="hash mismatch"):
        await client.request(Cmd.BLOB_PUT, sha256=wrong, offset=0, size=len(data), data=data)
    assert (await client.request(Cmd.BLOB_HAVE, sha256=[wrong]))["missing"] == [wrong]
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(BrokerError, match="out of order"):
        await client.request(Cmd.BLOB_PUT, sha256=sha, offset=5, size=len(data), data=data[5:])
    with pytest.raises(BrokerError, match="not a sha256"):
        await client.request(Cmd.BLOB_GET, sha256="../../etc/passwd", offset=0, length=10)
    with pytest.raises(BrokerError, match="no blob"):
        await client.request(Cmd.BLOB_GET, sha256=sha, offset=0, length=10)


async def test_a_spec_naming_a_blob_that_was_never_uploaded_is_refused(broker, client, tmp_path):
    spec = {"recipe": {"file": make_ref("b" * 64, "recipe.py")}, "tuning": {"config_set": [{"rtn": {}}]}}
    with pytest.raises(BrokerError, match="not uploaded"):
        await client.request(Cmd.SUBMIT, spec=spec)


async def test_cache_evicts_least_recently_used_but_never_a_pinned_blob(tmp_path):
    blobs = {}
    for name in ("one", "two", "three"):
        tree = tmp_path / "src" / name
        tree.mkdir(parents=True)
        (tree / "w.bin").write_bytes(os.urandom(1000))
        with open(tmp_path / f"{name}.tar", "wb") as f:
            pack_tree(tree, f)
        blobs[name] = hashlib.sha256((tmp_path / f"{name}.tar").read_bytes()).hexdigest()

    async def download(sha, dest):
        name = next(n for n, s in blobs.items() if s == sha)
        dest.write_bytes((tmp_path / f"{name}.tar").read_bytes())

    cache = BlobCache(tmp_path / "cache", max_bytes=2500)
    for used_at, name in enumerate(("one", "two", "three"), 1):
        path = await cache.path(blobs[name], name, download)
        assert (path / "w.bin").stat().st_size == 1000
        os.utime(cache.entry(blobs[name]) / "size", (used_at, used_at))  # one, then two, then three
    # Room for two and a half entries, counted as the cache counts them: blocks on disk.
    cache.max_bytes = int(2.5 * max(int((cache.entry(s) / "size").read_text()) for s in blobs.values()))
    cache.pin(blobs["one"])  # least recently used, but in use
    assert cache.evict() == [blobs["two"]]
    assert cache.entry(blobs["one"]).exists()
    cache.unpin(blobs["one"])
    assert cache.fetched == 3
    await cache.path(blobs["three"], "three", download)
    assert cache.fetched == 3  # served from the cache
    await cache.path(blobs["two"], "two", download)
    assert cache.fetched == 4  # evicted, so fetched again
    # Erased (DROP: its task was deleted): at once, or when the last job using it lets go.
    cache.drop(blobs["three"])
    assert not cache.entry(blobs["three"]).exists()
    cache.pin(blobs["two"])
    cache.pin(blobs["two"])
    cache.drop(blobs["two"])
    cache.unpin(blobs["two"])
    assert cache.entry(blobs["two"]).exists()  # still in use by one job
    cache.unpin(blobs["two"])
    assert not cache.entry(blobs["two"]).exists() and not cache.doomed


def _sparse_blob(tmp_path, fmt: str, claimed: int = 15 * 10**9):
    """A blob whose one file is a GNU sparse member claiming `claimed` bytes (a few KiB stored)."""
    import shutil
    import subprocess

    if shutil.which("tar") is None or "GNU tar" not in subprocess.run(["tar", "--version"], capture_output=True,
                                                                       text=True).stdout:
        pytest.skip("GNU tar is needed to write sparse members")
    src = tmp_path / f"src-{fmt}" / "model"
    src.mkdir(parents=True)
    with open(src / "weights.bin", "wb") as f:
        f.write(b"head")
        f.truncate(claimed)  # a hole: takes no disk space here
    blob = tmp_path / f"sparse-{fmt}.tar"
    subprocess.run(["tar", "-C", str(src.parent), "--sparse", f"--format={fmt}", "-cf", str(blob), "model"],
                   check=True)
    shutil.rmtree(src.parent)
    return blob


@pytest.mark.parametrize("fmt", ["gnu", "posix"])  # GNU 'S' members; PAX GNU.sparse 1.0 headers
async def test_a_sparse_member_claiming_15_gb_is_refused_and_nothing_big_is_written(tmp_path, fmt):
    from nsd.blobs import disk_bytes

    blob = _sparse_blob(tmp_path, fmt)
    assert blob.stat().st_size < 64 * 1024
    with tarfile.open(blob) as tar:  # what it claims
        assert tar.getmembers()[-1].sparse is not None or tar.getmembers()[-1].type == tarfile.GNUTYPE_SPARSE
    with pytest.raises(ValueError, match="'model/weights.bin' is a sparse file; only regular files and folders"):
        unpack_tree(blob, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    cache = BlobCache(tmp_path / "cache", max_bytes=10**9)

    async def download(sha, dest):
        dest.write_bytes(blob.read_bytes())

    with pytest.raises(ValueError, match="sparse file"):
        await cache.path("e" * 64, "model", download)
    assert disk_bytes(tmp_path / "cache") < 64 * 1024
    assert max((f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file()), default=0) == 0


@pytest.mark.parametrize("kind, what", [(tarfile.SYMTYPE, "a symbolic link"), (tarfile.LNKTYPE, "a hard link"),
                                        (tarfile.CHRTYPE, "a device"), (tarfile.BLKTYPE, "a device"),
                                        (tarfile.FIFOTYPE, "a fifo")])
def test_links_devices_and_fifos_are_refused(tmp_path, kind, what):
    blob = tmp_path / "blob.tar"
    with tarfile.open(blob, "w") as tar:
        folder = tarfile.TarInfo("model")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        data = tarfile.TarInfo("model/a.txt")
        data.size = 1
        tar.addfile(data, io.BytesIO(b"a"))
        odd = tarfile.TarInfo("model/odd")
        odd.type, odd.linkname = kind, "model/a.txt" if kind == tarfile.LNKTYPE else "/etc/passwd"
        tar.addfile(odd)
    with pytest.raises(ValueError, match=f"'model/odd' is {what}, not a file or folder"):
        unpack_tree(blob, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


async def test_cache_counts_the_bytes_its_entries_take_on_disk(tmp_path):
    """Many small files take a block each: the cache counts allocated blocks, not the blob's size."""
    from nsd.blobs import disk_bytes

    src = tmp_path / "src" / "model"
    src.mkdir(parents=True)
    for i in range(50):
        (src / f"f{i}.txt").write_bytes(b"x")
    tar = io.BytesIO()
    pack_tree(src, tar)
    cache = BlobCache(tmp_path / "cache", max_bytes=10**9)

    async def download(sha, dest):
        dest.write_bytes(tar.getvalue())

    path = await cache.path("f" * 64, "model", download)
    recorded = int((cache.entry("f" * 64) / "size").read_text())
    assert recorded == disk_bytes(cache.entry("f" * 64) / "tree") > 0
    assert recorded == sum(os.lstat(p).st_blocks * 512 for p in [path.parent, *path.parent.rglob("*")])


def _python_without_the_tar_data_filter() -> str | None:
    """A Python 3.11 here whose tarfile predates PEP 706 (3.11.0-3.11.3; Debian 12's python3 is 3.11.2)."""
    import shutil
    import subprocess

    for python in ("/usr/bin/python3", "/usr/bin/python3.11", shutil.which("python3")):
        if python and os.path.exists(python):
            out = subprocess.run([python, "-c", "import sys, tarfile; print(sys.version_info[:2] >= (3, 11) and "
                                  "not hasattr(tarfile, 'data_filter'))"], capture_output=True, text=True)
            if out.stdout.strip() == "True":
                return python
    return None


OLD_PYTHON = _python_without_the_tar_data_filter()
_UNPACK_ON_AN_OLD_PYTHON = r"""
import io, os, sys, tarfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from nsd.blobs import BlobMemberError, pack_tree, unpack_tree
tmp = Path(sys.argv[2])
(tmp / "model" / "sub").mkdir(parents=True)
(tmp / "model" / "sub" / "w.bin").write_bytes(b"weights")
(tmp / "model" / "run.sh").write_text("echo")
os.chmod(tmp / "model" / "run.sh", 0o4777)
with open(tmp / "blob.tar", "wb") as out:
    pack_tree(tmp / "model", out)
unpack_tree(tmp / "blob.tar", tmp / "out")
assert (tmp / "out" / "model" / "sub" / "w.bin").read_bytes() == b"weights"
assert oct(os.stat(tmp / "out" / "model" / "run.sh").st_mode & 0o7777) == oct(0o755)
for name in ("../escaped.txt", "model/../../escaped.txt", "/tmp/absolute.txt"):
    with tarfile.open(tmp / "evil.tar", "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    try:
        unpack_tree(tmp / "evil.tar", tmp / "dest" / "x")
    except BlobMemberError as exc:
        assert "outside the destination" in str(exc), exc
    else:
        raise AssertionError(name + " was unpacked")
assert not list(tmp.rglob("escaped.txt")) and not (tmp / "dest" / "x").exists()
assert not Path("/tmp/absolute.txt").exists()
print("ok")
"""


@pytest.mark.skipif(OLD_PYTHON is None, reason="no Python 3.11 without tarfile's data filter here")
def test_unpacking_is_as_safe_on_a_python_without_the_tar_data_filter(tmp_path):
    """`make demo` on Debian 12's own python3 (3.11.2): blobs unpack, and nothing escapes its folder."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([OLD_PYTHON, "-c", _UNPACK_ON_AN_OLD_PYTHON, str(root), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
