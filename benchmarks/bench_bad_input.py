"""How fast and how quietly bad input is refused: each case of the README's bad-input list as
its own `sparsegpt` process, imports included.

Prints per case: wall seconds, exit code, lines on stderr, the first line, and whether
anything was written (the run directory must not exist afterwards, or be unchanged). The
target (issue 17): every case under 5 s on this machine, exit code 2, exactly one line.

    python benchmarks/bench_bad_input.py [--model smollm2-135m] [--repeat 1]

The model is resolved once before timing (the embedded default is converted on first use).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_S = 5.0


def cases(model: str, tmp: Path) -> list[tuple[str, list[str]]]:
    """(name, arguments after `sparsegpt`); RUN is a run directory that must stay untouched."""
    run = str(tmp / "run")
    short = tmp / "short.txt"
    short.write_text("too short\n")
    (tmp / "parent" / "some-run").mkdir(parents=True, exist_ok=True)
    prune = ["prune", model, "--run-dir", run]
    return [
        ("missing model", ["prune", "/no/such/model", "--run-dir", run]),
        ("not a model folder", ["prune", str(tmp), "--run-dir", run]),
        ("sparsity outside [0, 1)", [*prune, "--sparsity", "1.5"]),
        ("impossible N:M", [*prune, "--nm", "3:2"]),
        ("N:M wider than a layer's groups", [*prune, "--nm", "2:128"]),
        ("unknown dataset", [*prune, "--calib", "wikitext3"]),
        ("missing dataset file", [*prune, "--calib", "text=/no/such/corpus.txt"]),
        ("missing task file", [*prune, "--tasks", "piqa=/no/such/valid.jsonl"]),
        ("seqlen beyond positions", [*prune, "--seqlen", "100000"]),
        ("GPU asked, none here", [*prune, "--device", "cuda"]),
        ("run dir is a parent of runs", ["prune", model, "--run-dir", str(tmp / "parent")]),
        ("eval: nothing to evaluate", ["eval", model]),
        ("eval: seqlen beyond positions", ["eval", model, "--eval", "pydoc", "--seqlen", "100000"]),
        ("progressive: falling schedule", ["progressive", model, "--run-dir", run, "--schedule", "0.6,0.5"]),
        ("progressive: missing model", ["progressive", "/no/such/model", "--run-dir", run]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the slowest is reported")
    args = ap.parse_args()
    from stages.model.checkpoint import resolve_model

    resolve_model(args.model)  # the one-time conversion of the embedded model is not a refusal's cost
    exe = shutil.which("sparsegpt") or sys.exit("error: the sparsegpt command is not installed; pip install -e .")
    print(f"{'case':34} {'seconds':>7} {'rc':>3} {'lines':>5} {'wrote':>5}  first line")
    worst, failures = 0.0, 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, argv in cases(args.model, tmp):
            seconds = 0.0
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                proc = subprocess.run([exe, *argv], capture_output=True, text=True, cwd=tmp)
                seconds = max(seconds, time.perf_counter() - t0)
            lines = proc.stderr.splitlines()
            wrote = (tmp / "run").exists() or (tmp / "parent" / "run.json").exists()
            ok = seconds < TARGET_S and proc.returncode == 2 and len(lines) == 1 and not wrote and not proc.stdout
            failures += not ok
            worst = max(worst, seconds)
            first = lines[0] if lines else ""
            flag = "yes" if wrote else "no"
            print(f"{name:34} {seconds:7.2f} {proc.returncode:3d} {len(lines):5d} {flag:>5}  {first[:90]}")
    print(f"\nslowest {worst:.2f} s (target < {TARGET_S:.0f} s); cases off target: {failures}")


if __name__ == "__main__":
    main()
