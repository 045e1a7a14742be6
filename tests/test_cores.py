from nsd.worker.cores import allocate, numa_nodes, parse_cpulist

TWO_NODES = [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]


def test_numa_nodes_from_sysfs(tmp_path):
    for node, cpus in (("node0", "0-3"), ("node1", "4-7")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus)
    assert numa_nodes([1, 2, 5, 6, 9], tmp_path) == [[1, 2], [5, 6], [9]]
    assert numa_nodes([0, 1], tmp_path / "absent") == [[0, 1]]


def test_a_trial_stays_within_one_node_best_fit():
    free = {0, 1, 2, 3, 4, 5, 6, 7}
    assert allocate(free, TWO_NODES, 4) == (0, 1, 2, 3)
    assert allocate(free - {0}, TWO_NODES, 2) == (1, 2)  # the fuller node, keeping node 1 whole
    assert allocate(free - {0, 1}, TWO_NODES, 4) == (4, 5, 6, 7)
    assert allocate({3, 4}, TWO_NODES, 2) == (3, 4)  # nothing fits in one node: span
    assert allocate({3}, TWO_NODES, 2) is None


def test_an_idle_runners_cores_are_reused_first():
    assert allocate({0, 1, 2, 3}, TWO_NODES, 2, reusable=[(2, 3)]) == (2, 3)
    assert allocate({0, 1, 2}, TWO_NODES, 2, reusable=[(2, 3)]) == (0, 1)


def test_select_cpus_takes_exact_lists_or_the_first_n():
    import pytest

    from nsd.worker.cores import select_cpus

    allowed = [0, 1, 2, 3, 8, 9]
    assert select_cpus(allowed, cpus="0-3,8") == [0, 1, 2, 3, 8]
    assert select_cpus(allowed, cpus="9,1") == [1, 9]
    assert select_cpus(allowed, cores=2) == [0, 1]  # the first N: two workers with --cores 2 would collide
    assert select_cpus(allowed) == allowed
    for bad in ("4", "0,0", "", "a-b"):
        with pytest.raises(ValueError, match="--cpus"):
            select_cpus(allowed, cpus=bad)
    with pytest.raises(ValueError, match="not both"):
        select_cpus(allowed, cores=1, cpus="0")
    with pytest.raises(ValueError, match="--cores"):
        select_cpus(allowed, cores=7)


def test_local_workers_get_disjoint_cpu_sets_covering_every_cpu():
    from nsd.local import split_cpus

    assert split_cpus([0, 1], 2) == [[0], [1]]
    assert split_cpus([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert split_cpus([5, 1, 3], 3) == [[1], [3], [5]]
    assert split_cpus([0, 1], 3) == [[0], [1], [0]]  # more workers than CPUs: shared, one each
