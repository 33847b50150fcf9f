"""Importing `flows` before torch turns on torch's page-aligned (THP) allocation of large CPU tensors,
unless the environment chose already."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import os
import flows
import torch

large = [torch.empty(3 << 20, dtype=torch.uint8) for _ in range(8)]
small = [torch.empty(100) for _ in range(50)]  # interleaved, so the large ones land at varied offsets
large += [torch.empty(5 << 20) for _ in range(8)]
print(os.environ["THP_MEM_ALLOC_ENABLE"], sum(t.data_ptr() % 4096 == 0 for t in large), len(large))
"""


def probe(value: str | None) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = value
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    setting, aligned, total = out.stdout.split()
    return setting, int(aligned), int(total)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's THP allocation path is Linux-only")
def test_flows_turns_on_page_aligned_large_tensors():
    setting, aligned, total = probe(None)
    assert setting == "1"
    assert aligned == total  # every tensor of 2 MiB or more starts on a page


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's THP allocation path is Linux-only")
def test_the_users_setting_stands():
    setting, aligned, total = probe("0")
    assert setting == "0"
    assert aligned < total  # torch's default 64-byte alignment: 16 page-aligned starts would be chance
