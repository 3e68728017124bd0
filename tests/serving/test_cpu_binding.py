"""How CPU shard workers sharing a node split its CPUs (workers/cpu_binding.py)."""

import os

import pytest

from workers.cpu_binding import bind, check_setting, node_ranks, parse_cpu_list, worker_cpus

EIGHT = frozenset(range(8))


def test_cpu_lists_parse_like_taskset():
    assert parse_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpu_list("5") == {5}


@pytest.mark.parametrize("text", ["", "3-1", "a", "1,", "-1", "0-999999999", "1 2", "0-3|4"])
def test_a_bad_cpu_list_is_refused(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_workers_are_ranked_within_their_node_in_group_order():
    assert node_ranks(["a", "b", "a", "a", "b"]) == [(0, 3), (0, 2), (1, 3), (2, 3), (1, 2)]


def test_auto_splits_a_nodes_cpus_into_equal_disjoint_slices():
    slices = [worker_cpus("auto", EIGHT, rank, 3) for rank in range(3)]
    assert slices == [{0, 1}, {2, 3}, {4, 5}]  # 8 // 3 each; the remainder stays free
    assert worker_cpus("auto", frozenset({4, 9, 2, 7}), 1, 2) == {7, 9}  # the allowed CPUs in order, not 0..n


def test_auto_leaves_a_lone_worker_and_an_overcrowded_node_unbound():
    assert worker_cpus("auto", EIGHT, 0, 1) is None
    assert worker_cpus("auto", frozenset({0, 1}), 2, 3) is None
    assert worker_cpus("all", EIGHT, 0, 2) is None


def test_explicit_lists_are_one_per_worker_of_the_node_and_within_its_cpus():
    assert worker_cpus("0-3|4-7", EIGHT, 1, 2) == {4, 5, 6, 7}
    with pytest.raises(ValueError, match="names 2 CPU lists for 3 workers"):
        worker_cpus("0-3|4-7", EIGHT, 0, 3)
    with pytest.raises(ValueError, match=r"CPUs \[8, 9\] are not allowed"):
        worker_cpus("0-3|6-9", EIGHT, 1, 2)


def test_the_replica_setting_is_checked_by_name():
    from cluster.replica_config import ReplicaConfig, ServingConfigError

    assert ReplicaConfig.from_overrides({"cpu_bind": "0-1|2-3"}).cpu_bind == "0-1|2-3"
    assert check_setting("auto") == "auto"
    with pytest.raises(ServingConfigError, match="cpu_bind: "):
        ReplicaConfig.from_overrides({"cpu_bind": "0-3|x"})


def test_bind_restricts_this_thread_and_reports_it():
    import threading

    before = os.sched_getaffinity(0)
    seen = {}

    def run():  # a thread of its own, so the test process keeps its affinity
        seen["unbound"] = bind(None)
        seen["bound"] = bind(frozenset({min(before)}))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == {"unbound": before, "bound": {min(before)}}
    assert os.sched_getaffinity(0) == before
