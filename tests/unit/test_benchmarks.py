"""The serving benchmark's CPU accounting (benchmarks/serving.py): each process's time goes to its group."""

import os
import time

import pytest

from .conftest import benchmark_module


@pytest.fixture(scope="module")
def serving():
    yield from benchmark_module("serving")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")
def test_cpu_time_is_split_by_process_group_per_image(serving):
    before = serving._process_ticks()
    assert before[os.getpid()][0] == "Ray and the rest"  # this process is none of the service's
    end = time.process_time() + 0.3
    while time.process_time() < end:  # 0.3 s of CPU in this process
        pass
    after = serving._process_ticks()
    mine = {os.getpid(): after[os.getpid()]}
    assert 250 <= serving._cpu_by_group(before, mine, images=1000)["Ray and the rest"] <= 500  # µs per image
    used = serving._cpu_by_group(before, after, images=1000)
    assert used["Ray and the rest"] >= 250 and set(used) <= {*serving.PROCESS_GROUPS, "Ray and the rest"}


def test_the_cpu_table_totals_each_configuration(serving):
    rows = [{"log": True, "prada": False, "accounts": 1, "cpu_us_per_image": {"replicas": 250.0, "clients": 50.0}},
            {"log": True, "prada": True, "accounts": 64,
             "cpu_us_per_image": {"replicas": 290.0, "shards": 40.0, "clients": 50.0, "Ray and the rest": 20.0}}]
    lines = serving.cpu_table(rows)
    assert "| configuration | replicas | shards | clients | Ray and the rest | total |" in lines
    assert "| log on, PRADA off | 250 | 0 | 50 | 0 | 300 |" in lines
    assert "| log on, PRADA on, 64 accounts per client | 290 | 40 | 50 | 20 | 400 |" in lines
    assert serving.cpu_table([{"log": True, "prada": False}]) == []  # results from before the table existed
