"""Deployment figures, the statistics and the clocks: how long one batch takes (warm-up, then repeats until the
spread is small or the wall budget is spent), and how much memory loading and running a model added to the
process. No torch here: the model is a callable; what makes each form fast is `nsd.quant.deploy`.

A figure is only as good as its spread, so every one carries it: `spread` is (p90 - p10) / p50 of the timed
calls. The repeats stop once at least `min_repeats` calls have run and the spread is within `target_spread`,
or when `budget_s` of timed calls have passed (never before `min_repeats`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

WARMUP_CALLS = 3  # after the first (compiling) call: caches, allocator, thread pool settle
MIN_REPEATS = 5
MAX_REPEATS = 200
BUDGET_S = 3.0  # wall time of timed calls per measured form
TARGET_SPREAD = 0.05  # (p90 - p10) / p50


@dataclass(frozen=True)
class Policy:
    """How long to time one form: warm-up calls, then repeats until settled (see the module docstring)."""
    warmup: int = WARMUP_CALLS
    min_repeats: int = MIN_REPEATS
    max_repeats: int = MAX_REPEATS
    budget_s: float = BUDGET_S
    target_spread: float = TARGET_SPREAD


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def spread(samples: Sequence[float]) -> float:
    """(p90 - p10) / p50: how far apart the middle 80% of the calls lie, relative to the median."""
    p50 = percentile(samples, 50)
    return (percentile(samples, 90) - percentile(samples, 10)) / p50 if p50 > 0 else math.inf


def settled(samples: Sequence[float], policy: Policy, elapsed_s: float) -> bool:
    """Whether to stop timing: enough calls and a small spread, or the budget (or the cap) is spent."""
    n = len(samples)
    if n >= policy.max_repeats:
        return True
    if n < policy.min_repeats:
        return False
    return elapsed_s >= policy.budget_s or spread(samples) <= policy.target_spread


def summary(samples_s: Sequence[float], batch: int) -> dict:
    """Latency per batch (p50, p90, ms), its spread, the number of timed calls and the throughput at p50."""
    p50 = percentile(samples_s, 50)
    return {"p50_ms": p50 * 1e3, "p90_ms": percentile(samples_s, 90) * 1e3, "spread": spread(samples_s),
            "repeats": len(samples_s), "throughput": batch / p50 if p50 > 0 else 0.0}


def time_calls(call: Callable[[], object], policy: Policy = Policy(),
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of `call`, after `policy.warmup` untimed calls, repeated until `settled`."""
    for _ in range(policy.warmup):
        call()
    samples: list[float] = []
    start = clock()
    while not settled(samples, policy, clock() - start):
        t0 = clock()
        call()
        samples.append(clock() - t0)
    return samples


# ---- memory: the process's resident set high-water mark (Linux) ---------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _trim() -> None:
    """Return freed memory to the system first, so that what the model needs shows as new resident memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Resident memory a model adds to this process while it is loaded and run: the RSS high-water mark
    (VmHWM) above the RSS right before loading, the mark reset there (`/proc/self/clear_refs` 5, Linux 4.0+).
    Freed memory is trimmed first, so reused heap does not hide the model's. None where /proc forbids the
    reset (a figure we cannot take is not estimated)."""

    def __init__(self) -> None:
        self.base_kib: int | None = None

    def start(self) -> None:
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.base_kib = None
            return
        self.base_kib = _status_kib("VmRSS")

    def restart_mark(self) -> None:
        """Reset the high-water mark to the RSS now, keeping the base (to see the running peak alone)."""
        if self.base_kib is None:
            return
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_bytes(self) -> int | None:
        hwm = _status_kib("VmHWM")
        if self.base_kib is None or hwm is None:
            return None
        return max(0, hwm - self.base_kib) * 1024


def tree_bytes(paths: Sequence[str]) -> int:
    """Bytes on disk of these files and folders (regular files, recursively; links not followed)."""
    import os

    total = 0
    for path in paths:
        if os.path.isfile(path) and not os.path.islink(path):
            total += os.path.getsize(path)
            continue
        for root, _, files in os.walk(path):
            for name in files:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    total += os.path.getsize(full)
    return total
