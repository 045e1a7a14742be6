"""Placement of jobs on free slots, as a pure function (the ipyparallel way).

Higher `priority` is served first: a tier gets every slot it can use before a lower tier gets any.
Within a tier, slots are shared fairly: each free slot goes to the task running the fewest jobs right
now (oldest first on ties), so a small task submitted behind a large one starts at its next free slot
instead of waiting for the large one to drain (Neural Solution's FIFO queue blocked on its head), and
two large tasks split the cluster evenly. A job goes to the worker where it fits most tightly (best fit,
earliest registered on ties), which keeps whole blocks of cores free for tasks that run wider trials.
A task's own `workers` limit is applied before this, in `wants`. A task pinned to a kind of machine
(`resources.hardware`) is placed only on workers with that `--label`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    task_id: str
    wants: int  # jobs this task could start now (already capped by its `workers` limit)
    priority: int = 0
    running: int = 0  # jobs it runs now
    cores: int = 0  # cores each of its jobs needs; 0: the worker's own slot size
    label: str | None = None  # only workers with this label (resources.hardware); None: any


def place(free_cores: dict[str, int], demands: list[Demand],
          slot_cores: dict[str, int] | None = None, labels: dict[str, str | None] | None = None) -> list[tuple[str, str]]:
    """(task_id, worker_id) pairs to assign now. `free_cores`: per worker; `slot_cores`: each worker's
    slot size (1 if not given), used for tasks that do not set their own cores per trial; `labels`: each
    worker's --label, for tasks pinned to one."""
    free = {w: n for w, n in free_cores.items() if n > 0}
    unit = slot_cores or {}
    wants = {d.task_id: d.wants for d in demands if d.wants > 0}
    running = {d.task_id: d.running for d in demands}
    age = {d.task_id: i for i, d in enumerate(demands)}
    priority = {d.task_id: d.priority for d in demands}
    out: list[tuple[str, str]] = []
    need = {d.task_id: d.cores for d in demands}
    label = {d.task_id: d.label for d in demands}
    labels = labels or {}
    while free and wants:
        task_id = min(wants, key=lambda t: (-priority[t], running[t], age[t]))
        cost = {w: need[task_id] or unit.get(w, 1) for w in free}
        fits = [w for w in free if cost[w] <= free[w] and label[task_id] in (None, labels.get(w))]
        if not fits:  # no worker has room for this task's shape now; others may still fit
            del wants[task_id]
            continue
        worker = min(fits, key=lambda w: free[w] - cost[w])  # best fit; ties: earliest registered
        out.append((task_id, worker))
        running[task_id] += 1
        free[worker] -= cost[worker]
        if not free[worker]:
            del free[worker]
        wants[task_id] -= 1
        if not wants[task_id]:
            del wants[task_id]
    return out
