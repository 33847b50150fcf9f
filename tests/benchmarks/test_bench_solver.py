"""bench_solver's --layouts: both buffer layouts are timed, and the solver's own choice is restored."""

from __future__ import annotations

import argparse

import torch

import benchmarks.bench_solver as bench_solver
from sparsegpt import solver


def test_layouts_times_both_and_restores_the_choice(monkeypatch, capsys):
    chosen = solver._by_column
    seen = []
    space = solver._BlockSpace

    def recording(*a, **kw):
        seen.append(a[-1])  # by_column
        return space(*a, **kw)

    monkeypatch.setattr(solver, "_BlockSpace", recording)
    args = argparse.Namespace(dtype="float32", prune_nm=(0, 0), nm=None, repeats=1)
    bench_solver.bench_layouts(16, 256, args, torch.device("cpu"))
    assert solver._by_column is chosen
    assert set(seen) == {True, False}
    line = capsys.readouterr().out
    assert "16x256" in line and "by column" in line and "by row" in line and "% less time" in line
