"""Runner sandboxes: what a runner process sees (bubblewrap), its environment, and the folders the worker
gives it. docs/design.md "Runner sandbox" says what holds and why bubblewrap.

A sandboxed runner runs under `bwrap` in new user, mount, pid, network, ipc, uts and cgroup namespaces,
with no capabilities and no way to make another user namespace. It sees the system, Python, the venv and
nsd read-only (`Layout`: a short list of paths, not the whole root), the operator's shared dirs read-only,
and two folders of its own (`RunnerDirs`): `scratch`, read-write (its HOME, TMPDIR and /tmp, INC's
nc_workspace, numba's and Hugging Face's caches), wiped when the runner goes; `files`, read-only, where
the worker links the current job's blobs for the job's duration. It does not see the worker's cache,
keys, outbox or other runners' folders, has only its own loopback, and its /proc shows its own processes.
`bwrap_argv` is pure; the rest is small file work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nsd
from nsd.blobs import BlobMemberError, open_plain, plain_tree
from nsd.spec import PATH_FIELDS

log = logging.getLogger("nsd.worker")
BWRAP = "bwrap"
# The system a runner needs, read-only: libraries and binaries, the few /etc files a C library or Python
# reads (no /etc/nsd, no keys), and the CPU and NUMA layout torch reads.
SYSTEM_PATHS = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/host.conf", "/etc/localtime",
    "/etc/timezone", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
    "/etc/os-release", "/etc/mime.types", "/sys/devices/system/cpu", "/sys/devices/system/node",
)
MASK_BYTES = 1 << 20  # an empty tmpfs laid over a hidden folder (mount points for the runner's own folders)
# The worker's environment reaches a runner only by these names (and the operator's `runner_env`): what
# the worker was given (tokens, credentials) stays with it.
PASSED_ENV = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "USER", "LOGNAME", "LOGLEVEL", "PYTHONPATH",
                        "LD_LIBRARY_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"})
PASSED_PREFIXES = ("LC_", "OMP_", "KMP_", "MKL_", "ONEDNN_", "DNNL_", "NUMBA_", "TORCH_")


class SandboxError(RuntimeError):
    """No working sandbox here, or a setting that would let runners see what they must not."""


@dataclass(frozen=True)
class Layout:
    """What every sandboxed runner of a worker sees besides its own folders (plain data; `layout` builds it)."""
    links: tuple[tuple[str, str], ...] = ()  # (path, target): symlinks as on the host (/bin -> usr/bin)
    binds: tuple[str, ...] = ()  # read-only at the same path: the system, Python, the venv, nsd
    shared: tuple[str, ...] = ()  # the operator's shared dirs (model.shared = true tasks), read-only
    masks: tuple[tuple[str, bool], ...] = ()  # (path, is a folder): inside a bind, yet hidden (cache, keys)


def python_paths() -> list[str]:
    """Python, the venv and nsd itself (an editable install lives outside the venv)."""
    return [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, str(Path(nsd.__file__).parent)]


def under(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def layout(shared_dirs=(), hidden=()) -> Layout:
    """The layout for this machine: SYSTEM_PATHS and python_paths() that exist (symlinks kept as links to
    their targets), the shared dirs, and masks over the `hidden` paths (the worker's cache dir, its keys)
    that would otherwise be visible inside one of them. A shared dir inside a hidden path is refused."""
    links: list[tuple[str, str]] = []
    binds: list[str] = []
    for path in (*SYSTEM_PATHS, *python_paths()):
        _add_visible(os.path.abspath(path), links, binds)
    shared = tuple(dict.fromkeys(os.path.realpath(d) for d in shared_dirs))
    hidden = [os.path.realpath(h) for h in hidden if h]
    for d in shared:
        for h in hidden:
            if under(d, h):
                raise SandboxError(f"shared dir {d} is inside {h}, which runners must never see")
    masks = tuple((h, os.path.isdir(h)) for h in hidden
                  if os.path.exists(h) and any(under(h, v) for v in (*binds, *shared)))
    return Layout(tuple(links), tuple(binds), shared, masks)


def _add_visible(path: str, links: list, binds: list) -> None:
    if not os.path.lexists(path) or any(under(path, b) for b in binds):
        return
    if os.path.islink(path):
        links.append((path, os.readlink(path)))
        _add_visible(os.path.realpath(path), links, binds)
    else:
        binds.append(path)


def bwrap_argv(lay: Layout, scratch: str, files: str, command: list[str]) -> list[str]:
    """The bwrap command line that runs `command` in a runner's sandbox (later mounts lie over earlier)."""
    argv = [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
            "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm",
            "--bind", os.path.join(scratch, "tmp"), "/tmp"]  # first: what lies under /tmp is bound over it
    for path, target in lay.links:
        argv += ["--symlink", target, path]
    for path in (*lay.binds, *lay.shared):
        argv += ["--ro-bind", path, path]
    for path, is_dir in lay.masks:
        argv += ["--size", str(MASK_BYTES), "--tmpfs", path] if is_dir else ["--ro-bind", "/dev/null", path]
    return argv + ["--bind", scratch, scratch, "--ro-bind", files, files, "--chdir", scratch, "--", *command]


def runner_env(n_cpus: int, scratch: Path | None = None, preload: str = "", passed=()) -> dict[str, str]:
    """A runner's environment: PASSED_ENV, PASSED_PREFIXES and the names in `passed` from ours, nothing else.
    INC packs RTN weights with numba only where TBB loads (its `can_pack_with_numba`): the `tbb` wheel puts
    libtbb in <venv>/lib, which the dynamic loader searches only if LD_LIBRARY_PATH names it before the
    process starts. numba's threads = the runner's cores. With a scratch folder, every cache a library keeps
    (numba's compiled packers, Hugging Face's, HOME, TMPDIR) is in it. NSD_RUNNER_PRELOAD names modules a
    runner imports before its first job."""
    env = {k: v for k, v in os.environ.items()
           if k in PASSED_ENV or k.startswith(PASSED_PREFIXES) or k in passed}
    env.setdefault("PATH", os.defpath)
    if scratch is not None:
        env.update(HOME=str(scratch / "home"), TMPDIR=str(scratch / "tmp"), XDG_CACHE_HOME=str(scratch / "cache"),
                   HF_HOME=str(scratch / "hf"), NUMBA_CACHE_DIR=str(scratch / "numba"))
    if preload:
        env["NSD_RUNNER_PRELOAD"] = preload
    lib = os.path.join(sys.prefix, "lib")
    if os.path.exists(os.path.join(lib, "libtbb.so.12")):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    env.setdefault("NUMBA_NUM_THREADS", str(n_cpus))
    return env


@dataclass(frozen=True)
class RunnerDirs:
    """A runner's own folders under `home` (the worker's cache dir/runners/N)."""
    home: Path

    @property
    def scratch(self) -> Path:
        return self.home / "scratch"

    @property
    def files(self) -> Path:
        return self.home / "files"

    def fresh(self) -> None:
        """Empty folders for a new runner process: nothing of the last one's survives."""
        self.remove()
        for sub in ("tmp", "home", "numba"):
            (self.scratch / sub).mkdir(parents=True)
        self.files.mkdir()

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)  # never follows a link (fd-based on Linux)

    def clear_files(self) -> None:
        with os.scandir(self.files) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)


def link_tree(src: Path, dst: Path, copy: bool = False) -> None:
    """`src`'s folders and regular files again at `dst`: each file a hard link to src's (no bytes copied;
    copied where the file systems differ), or a copy with `copy` (where the copy may be written). Files
    `dst` has already are left alone. Never follows a link: a link in `src` raises BlobMemberError."""
    for rel, folder, name, st in plain_tree(src):
        target = dst / rel if rel else dst
        if stat.S_ISDIR(st.st_mode):
            target.mkdir(parents=True, exist_ok=True)
            continue
        if os.path.lexists(target):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if not copy:
            try:
                os.link(name, target, src_dir_fd=folder, follow_symlinks=False)
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM):
                    raise
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with open_plain(name, folder) as f, open(partial, "wb") as out:
            shutil.copyfileobj(f, out)
        os.replace(partial, target)


def take(folder: Path, name: str, dest: Path) -> Path:
    """Move `folder/name`, a folder a runner made in its scratch, to `dest` (the worker's own, on the same
    file system), without following a link: a link or anything but a folder is removed instead, and raises
    BlobMemberError. After the move the runner cannot reach it by any path."""
    if not name or "/" in name or name in (".", ".."):
        raise BlobMemberError(f"not a folder name: {name[:80]!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.rename(name, dest, src_dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISDIR(os.lstat(dest).st_mode):
        os.unlink(dest)
        raise BlobMemberError(f"{name!r} is not a folder")
    return dest


def runner_layout(sandbox: bool, shared_dirs, hidden, home: Path) -> Layout | None:
    """A worker's `layout()`, once a runner has started in it here (`probe`, in the folder `home`); None,
    with a warning, when the worker was told to run its runners unsandboxed."""
    if not sandbox:
        log.warning("RUNNERS ARE NOT SANDBOXED (--no-sandbox): a python recipe can read this worker's keys, cache "
                    "and other tasks' files, use the network and signal this process. For development only.")
        return None
    lay = layout(shared_dirs, [str(h) for h in hidden if h])
    why = probe(lay, home)
    if why is not None:
        raise SandboxError(f"runners cannot be sandboxed here: {why}. Install bubblewrap, or run `nsd worker "
                           f"--no-sandbox` for development only")
    return lay


def shared_task_paths(spec: dict) -> dict[str, str]:
    """A model.shared task's paths, links resolved, by field ({} for other tasks: theirs are blobs)."""
    if not spec["model"].get("shared"):
        return {}
    return {f"{a}.{b}": os.path.realpath(spec[a][b]) for a, b in PATH_FIELDS if spec[a].get(b)}


def probe(lay: Layout, home: Path) -> str | None:
    """None when a sandboxed runner can start here (bwrap runs, Python and nsd import inside), else why not."""
    if shutil.which(BWRAP) is None:
        return "bubblewrap is not installed (Debian: apt-get install bubblewrap)"
    dirs = RunnerDirs(home)
    dirs.fresh()
    command = [sys.executable, "-c", "import nsd.worker.runner"]
    try:
        proc = subprocess.run(bwrap_argv(lay, str(dirs.scratch), str(dirs.files), command), capture_output=True,
                              timeout=120, env=runner_env(1, dirs.scratch))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not run: {exc}"
    finally:
        dirs.remove()
    if proc.returncode != 0:
        return f"bwrap failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-800:]}"
    return None


JOB_LOG = "job.log"  # the current job's log, as its runner sees it: a hard link, in its scratch, to the worker's


def expose(job: dict, blobs: Path, dirs: RunnerDirs) -> dict:
    """The job as its runner sees it: its blobs (paths under the worker's blob cache `blobs`) and the model a
    trial kept are linked into the runner's `files` folder, its log into its scratch, and the job names
    those. The worker empties `files` when the job ends (RunnerDirs.clear_files)."""
    spec = {key: dict(value) if isinstance(value, dict) else value for key, value in job["spec"].items()}
    for section, key in PATH_FIELDS:
        path = spec[section].get(key)
        if path and under(path, blobs):
            parts = Path(path).relative_to(blobs).parts  # <sha256>/tree/<name>
            target = dirs.files / parts[0] / parts[-1]
            link_tree(Path(path), target)
            spec[section][key] = str(target)
    job = {**job, "spec": spec}
    if job.get("kept"):
        target = dirs.files / "kept" / "model"
        link_tree(Path(job["kept"]), target)
        job["kept"] = str(target)
    if job.get("artifact") and under(job["artifact"], blobs):  # a verify job's saved model (read-only)
        target = dirs.files / "artifact" / Path(job["artifact"]).name
        link_tree(Path(job["artifact"]), target)
        job["artifact"] = str(target)
    if job.get("log"):
        link = dirs.scratch / JOB_LOG
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.link(job["log"], link, follow_symlinks=False)
        job["log"] = str(link)
    return job
