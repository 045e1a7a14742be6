"""Which cores a trial runs on: NUMA topology and core allocation, as pure functions (plus one sysfs read)."""

from __future__ import annotations

from pathlib import Path

NODE_ROOT = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def numa_nodes(cpus: list[int], root: Path = NODE_ROOT) -> list[list[int]]:
    """The given CPUs grouped by NUMA node (one group where the machine has one node or sysfs is absent)."""
    groups: list[list[int]] = []
    try:
        for node in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
            members = set(parse_cpulist((node / "cpulist").read_text()))
            group = [c for c in cpus if c in members]
            if group:
                groups.append(group)
    except (OSError, ValueError):
        groups = []
    placed = {c for g in groups for c in g}
    rest = [c for c in cpus if c not in placed]
    return groups + ([rest] if rest else []) if groups else [list(cpus)]


def allocate(free: set[int], nodes: list[list[int]], k: int,
             reusable: list[tuple[int, ...]] = ()) -> tuple[int, ...] | None:
    """k free cores for one trial, or None if they are not free now.

    An idle runner's exact core set comes first (its process and cached model stay warm); then the
    lowest cores of the NUMA node with the fewest free cores that still has k (best fit keeps large
    blocks whole for larger trials); a trial wider than every node spans nodes, fullest nodes first."""
    for cores in reusable:
        if len(cores) == k and set(cores) <= free:
            return cores
    free_by_node = [[c for c in node if c in free] for node in nodes]
    fitting = [cores for cores in free_by_node if len(cores) >= k]
    if fitting:
        return tuple(min(fitting, key=len)[:k])
    if sum(len(c) for c in free_by_node) < k:
        return None
    chosen: list[int] = []
    for cores in sorted(free_by_node, key=len, reverse=True):
        chosen += cores[: k - len(chosen)]
    return tuple(sorted(chosen))
