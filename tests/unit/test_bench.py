"""make bench's pure parts: which parts run, medians over rounds, payload comparison, the p99."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.harness import Result, logins
from benchmarks.latency import _quantile
from benchmarks.run import _check, median_result, parts_of


def test_parts_only_and_skip_and_the_old_name():
    assert parts_of(argparse.Namespace(only="mask,latency", skip="")) == {"mask", "latency"}
    assert parts_of(argparse.Namespace(only="", skip="kafka,rss")) == {"sink", "bridge", "e2e", "latency", "scaling"}
    with pytest.raises(SystemExit):
        parts_of(argparse.Namespace(only="mask,nope", skip=""))


def test_the_median_of_each_measure_over_rounds():
    runs = [
        Result("r", 10, seconds=s, rate=r, cpu_per_100k=c, first=f)
        for s, r, c, f in ((5.0, 100.0, 4.0, 1.0), (9.0, 300.0, 2.0, None), (7.0, 200.0, 3.0, 3.0))
    ]
    m = median_result("r", runs)
    assert (m.seconds, m.rate, m.cpu_per_100k, m.first) == (7.0, 200.0, 3.0, 2.0)


def test_outputs_compare_by_avro_payload_whatever_the_header():
    confluent = b"\x00\x00\x00\x00\x07" + b"payload"
    single = b"\xc3\x01" + b"12345678" + b"payload"
    assert "identical" in _check("x", {b"k": confluent}, {b"k": single})
    assert "MISMATCH" in _check("x", {b"k": confluent}, {b"k": single + b"!"})


def test_the_input_has_the_asked_number_of_users_and_distinct_ips():
    import json

    bodies = [json.loads(b) for b in logins(2000, users=100)]
    assert len({b["user_id"] for b in bodies}) <= 100 and len({b["user_id"] for b in bodies}) > 90
    assert len({b["ip"] for b in bodies}) == 2000 and len({b["device_id"] for b in bodies}) == 2000


def test_p99_of_latencies():
    assert _quantile([float(i) for i in range(100, 0, -1)], 0.99) == 99.0
    assert _quantile([float(i) for i in range(1, 1001)], 0.99) == 990.0
    assert _quantile([5.0], 0.99) == 5.0
