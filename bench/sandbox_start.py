"""What the runner sandbox costs at a runner's start: the same runner started with and without bubblewrap,
side by side, alternating, in this one script.

    .venv/bin/python bench/sandbox_start.py [--repeat 3]

(a) a bare interpreter that imports nsd's runner module (the sandbox's own set-up cost, 15 times each);
(b) a whole runner (`RunnerProcess`: fresh folders, torch and INC imported, numba packers from the worker's
cache) until it reports ready, `--repeat` times each. Prints medians, spreads and the ratio sandboxed/plain.
Needs bubblewrap (`apt-get install bubblewrap`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nsd.worker.sandbox import RunnerDirs, bwrap_argv, layout, runner_env  # noqa: E402
from nsd.worker.slots import RunnerProcess, RunnerSetup  # noqa: E402


def line(name: str, plain: list[float], boxed: list[float]) -> str:
    p, b = statistics.median(plain), statistics.median(boxed)
    return (f"{name:<28} plain {p:7.3f} s (min {min(plain):.3f}, max {max(plain):.3f})   sandboxed {b:7.3f} s "
            f"(min {min(boxed):.3f}, max {max(boxed):.3f})   ratio {b / p:5.2f}")


def interpreter(lay, work: Path, reps: int) -> tuple[list[float], list[float]]:
    dirs = RunnerDirs(work / "bare")
    dirs.fresh()
    command = [sys.executable, "-c", "import nsd.worker.runner"]
    env = runner_env(1, dirs.scratch)
    plain, boxed = [], []
    for _ in range(reps):
        for argv, out in ((command, plain), (bwrap_argv(lay, str(dirs.scratch), str(dirs.files), command), boxed)):
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, check=True)
            out.append(time.perf_counter() - t0)
    return plain, boxed


async def runner_ready(lay, work: Path, reps: int) -> tuple[list[float], list[float]]:
    cpu = sorted(os.sched_getaffinity(0))[:1]
    plain, boxed = [], []
    for i in range(reps):
        for sandbox, out in ((None, plain), (lay, boxed)):
            setup = RunnerSetup(sandbox, work / "blobs", work / "numba")
            runner = RunnerProcess(cpu, work / "runners" / f"{i}-{sandbox is not None}", work / "runner.log", setup)
            t0 = time.perf_counter()
            await runner.ready()
            out.append(time.perf_counter() - t0)
            await runner.stop()
    return plain, boxed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="whole runner starts, each way")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nsd-bench-sandbox-"))
    try:
        lay = layout([], [str(work)])
        warm = asyncio.run(runner_ready(lay, work, 1))  # fills the worker's numba cache, as a worker's first runner
        print(f"first runner (compiles numba's packers): {warm[0][0]:.2f} s plain, {warm[1][0]:.2f} s sandboxed")
        print(line("interpreter + import nsd", *interpreter(lay, work, 15)))
        print(line("runner until ready", *asyncio.run(runner_ready(lay, work, args.repeat))))
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
