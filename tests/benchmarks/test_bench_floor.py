"""bench_floor's profile: exclusive times per category, on a fake clock."""

from __future__ import annotations

import threading

import benchmarks.bench_floor as bench_floor


def test_profile_subtracts_nested_calls_and_ignores_other_threads(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench_floor.time, "perf_counter", lambda: now[0])
    profile = bench_floor.Profile()

    def inner():
        now[0] += 3.0

    inner = profile.wrap("hessian", inner)

    def outer():
        now[0] += 2.0
        inner()
        now[0] += 1.0

    outer = profile.wrap("forward", outer)
    outer()
    outer()
    assert dict(profile.seconds) == {"forward": 6.0, "hessian": 6.0}
    worker = threading.Thread(target=outer)  # the sequential mode's batch threads: timed by their caller
    worker.start()
    worker.join()
    assert dict(profile.seconds) == {"forward": 6.0, "hessian": 6.0}
