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


def select_cpus(allowed: list[int], cores: int | None = None, cpus: str | None = None) -> list[int]:
    """The CPUs a worker uses: `--cpus LIST` exactly (each must be one this process may run on), or the
    first `--cores N` of the allowed ones in ascending order, or all of them. Two workers on one host
    need disjoint `--cpus`: `--cores N` on both would take the same first N."""
    if cores is not None and cpus is not None:
        raise ValueError("give --cpus or --cores, not both")
    allowed = sorted(allowed)
    if cpus is not None:
        try:
            chosen = parse_cpulist(cpus)
        except ValueError:
            raise ValueError(f"--cpus {cpus!r}: expected a list like 0-3,8") from None
        if not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"--cpus {cpus!r}: empty, or a CPU named twice")
        outside = sorted(set(chosen) - set(allowed))
        if outside:
            raise ValueError(f"--cpus {cpus!r}: CPU {','.join(map(str, outside))} is not one this process may run "
                             f"on ({','.join(map(str, allowed))})")
        return sorted(chosen)
    if cores is not None:
        if not 1 <= cores <= len(allowed):
            raise ValueError(f"--cores must be between 1 and {len(allowed)} here")
        return allowed[:cores]
    return allowed
