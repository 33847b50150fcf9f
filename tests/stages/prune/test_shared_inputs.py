"""Calibration windows and block-0 inputs shared across run directories: a run that shares them lets the
next run of the same model and calibration link them instead of sampling and capturing again, with the
same weights; other settings, --no-cache or a damaged entry compute them; workers starting together
capture once."""

from __future__ import annotations

import threading
import time

import pytest

import stages.prune.oneshot as st
import stages.prune.streams as streams
from stages.prune import shared_inputs
from stages.prune.oneshot import run_pipeline
from tests.configs import run_weights as weights
from tests.configs import tiny_prune


@pytest.fixture
def calls(monkeypatch, tmp_path) -> dict[str, int]:
    """Counts of calibration samplings and block-0 captures, in a fresh shared cache."""
    monkeypatch.setenv("SPARSEGPT_CALIB_CACHE", str(tmp_path / "cache"))
    counts = {"sample": 0, "capture": 0}
    sample, capture = st.sample_calibration, streams.capture_inputs

    def counted(name, fn):  # noqa: ANN001, ANN202
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            counts[name] += 1
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(st, "sample_calibration", counted("sample", sample))
    monkeypatch.setattr(streams, "capture_inputs", counted("capture", capture))
    return counts


def test_a_shared_run_lets_the_next_one_link_its_inputs(tiny_llama_dir, tmp_path, calls):
    a = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "a", share_inputs=True))
    assert calls == {"sample": 1, "capture": 1}
    b = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "b", sparsity=0.6))  # another point of a sweep
    assert calls == {"sample": 1, "capture": 1}  # both linked from the cache
    entry = shared_inputs.tokens_entry(tiny_prune(tiny_llama_dir, tmp_path / "b"), tiny_llama_dir)
    assert (b.root / "calib" / "tokens.arrow").stat().st_ino == (entry / "calib" / "tokens.arrow").stat().st_ino
    same = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "c", share_inputs=True))
    assert calls == {"sample": 1, "capture": 1}
    wa, wc = weights(a.root), weights(same.root)
    assert wa.keys() == wc.keys() and all((wa[k] == wc[k]).all() for k in wa)  # linked inputs, same weights
    assert any((wa[k] != v).any() for k, v in weights(b.root).items())  # b pruned to 0.6 from the same inputs


def test_other_calibration_settings_or_no_cache_compute_their_own(tiny_llama_dir, tmp_path, calls):
    run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "a", share_inputs=True))
    run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "seed", seed=1))
    assert calls == {"sample": 2, "capture": 2}
    run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "batch", batch_size=2))  # same windows, other capture
    assert calls == {"sample": 2, "capture": 3}
    run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "off", cache=False))
    assert calls == {"sample": 3, "capture": 4}


def test_a_damaged_entry_is_computed_again(tiny_llama_dir, tmp_path, calls):
    cfg = tiny_prune(tiny_llama_dir, tmp_path / "a", share_inputs=True)
    run_pipeline(cfg)
    entry = shared_inputs.tokens_entry(cfg, tiny_llama_dir)
    (entry / "calib" / "tokens.arrow").unlink()
    (entry / "calib" / "tokens.arrow").write_bytes(b"short")
    run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "b"))
    assert calls == {"sample": 2, "capture": 1}
    assert (tmp_path / "b" / "calib" / "tokens.arrow").stat().st_size > 5


def test_two_runs_starting_together_sample_once(tiny_llama_dir, tmp_path, calls, monkeypatch):
    started = threading.Event()
    sample = st.sample_calibration

    def slow(*a, **k):  # noqa: ANN002, ANN003, ANN202
        started.set()
        time.sleep(1.0)  # the other run arrives while this one samples
        return sample(*a, **k)

    monkeypatch.setattr(st, "sample_calibration", slow)
    cfgs = [tiny_prune(tiny_llama_dir, tmp_path / name, share_inputs=True) for name in ("a", "b")]
    runs = [st.prepare(c) for c in cfgs]
    first = threading.Thread(target=st.calibrate, args=(cfgs[0], runs[0]))
    first.start()
    assert started.wait(60)
    st.calibrate(cfgs[1], runs[1])
    first.join()
    assert calls["sample"] == 1
    assert (runs[0].tokens.read_bytes()) == runs[1].tokens.read_bytes()
