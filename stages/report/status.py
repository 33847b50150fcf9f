"""`sparsegpt status RUN_DIR`: what a run has done, what is left, sizes and timings.

Reads only the run directory (no model, no Prefect), so it answers instantly even
while another process holds the run's lock.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.run.rundir import RUN_JSON, verify_record
from stages.run.shards import is_complete, shard_bytes


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_status(run_dir: Path) -> str:
    """A human-readable report of ``run_dir``; raises ValueError if it is not a run directory."""
    meta = run_dir / RUN_JSON
    if not meta.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {RUN_JSON}); start one with `sparsegpt prune`")
    run = json.loads(meta.read_text())
    cfg = run.get("options") or run["config"]  # older runs stored a flat config
    if "schedule" in cfg:
        return progressive_status(run_dir, run)
    lines = [
        f"run {run_dir}  (config {run['config_hash'][:12]}, created {run.get('created', '?')})",
        f"model {cfg['model']}  method {cfg['method']}  target {cfg.get('nm') or cfg['sparsity']}  "
        f"calib {cfg['calib']} {cfg['nsamples']}x{cfg['seqlen']}",
    ]
    calib = verify_record(run_dir / "calib" / "tokens.json", quick=True)
    lines.append(f"calibration: {'done' if calib else 'not done'}")
    records = sorted((run_dir / "blocks").glob("block_*.json"))
    done = [r for r in (verify_record(p, quick=True) for p in records) if r is not None]
    total_s = sum(r["seconds"] for r in done)
    lines.append(
        f"blocks done: {len(done)}"
        + (
            f" (last {done[-1]['block']}, {total_s:.1f} s in all, {total_s / len(done):.1f} s per block)"
            if done
            else ""
        )
    )
    acts = sorted(p for p in (run_dir / "acts").glob("block_*") if p.is_dir())
    for a in acts:
        lines.append(
            f"  activations {a.name}: {'complete' if is_complete(a, quick=True) else 'incomplete'}, "
            f"{_mb(shard_bytes(a))}"
        )
    model_rec = verify_record(run_dir / "model.json", quick=True)
    lines.append(f"assembled model: {'done, ' + _mb(_size(run_dir / 'model')) if model_rec else 'not yet'}")
    metrics = run_dir / "eval" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        for label, v in m.items():
            if isinstance(v, dict) and "ppl" in v:
                lines.append(
                    f"eval {label}: ppl {v['ppl']:.2f} (dense {v['dense_ppl']:.2f}), {v['windows']} x {v['seqlen']}"
                )
        for name, t in (m.get("tasks") or {}).items():
            lines.append(
                f"task {name}: acc {t['pruned']['acc']:.4f} (dense {t['dense']['acc']:.4f}), {t['pruned']['n']} items"
            )
        lines.append(f"achieved sparsity: {m['sparsity']['overall']:.4f}")
    else:
        lines.append("evaluation: not yet")
    lines.append(f"disk: {_mb(_size(run_dir))} in all")
    return "\n".join(lines)


def progressive_status(run_dir: Path, run: dict) -> str:
    """Rounds done and left of a progressive run, and where the unfinished round stands."""
    cfg = run.get("options") or run["config"]  # older runs stored a flat config
    schedule = [str(t) for t in cfg["schedule"]]
    lines = [
        f"progressive run {run_dir}  (config {run['config_hash'][:12]}, created {run.get('created', '?')})",
        f"model {cfg['model']}  schedule {','.join(schedule)}  fine-tuning {cfg['tokens_per_round']} tokens "
        f"per round of {cfg['finetune_data']}",
    ]
    for k, target in enumerate(schedule, start=1):
        root = run_dir / "rounds" / f"round_{k:02d}"
        rec = verify_record(root / "round.json", quick=True)
        if rec is not None:
            ppl = ", ".join(
                f"{lab} {rec['ppl_before'][lab]:.2f} -> {rec['ppl_after'][lab]:.2f}" for lab in rec["ppl_after"]
            )
            lines.append(
                f"round {k} ({target}): done, sparsity {rec['sparsity']:.4f}, {rec['tokens']} tokens, "
                f"{rec['seconds']:.0f} s" + (f", ppl before -> after fine-tuning: {ppl}" if ppl else "")
            )
            continue
        if not root.exists():
            lines.append(f"round {k} ({target}): not started")
            continue
        blocks = [
            r
            for r in (verify_record(p, quick=True) for p in sorted((root / "prune" / "blocks").glob("block_*.json")))
            if r
        ]
        pruned = verify_record(root / "prune" / "model.json", quick=True) is not None
        step = f"pruning, {len(blocks)} blocks done" if not pruned else "pruned"
        ckpts = sorted((root / "finetune" / "ckpt").glob("step_*"))
        if verify_record(root / "finetune" / "finetune.json", quick=True) is not None:
            step += ", fine-tuned, evaluating"
        elif (root / "finetune" / "finetune_config.json").is_file():
            step += f", fine-tuning ({'last checkpoint ' + ckpts[-1].name if ckpts else 'no checkpoint yet'})"
        lines.append(f"round {k} ({target}): in progress: {step}")
    lines.append(f"disk: {_mb(_size(run_dir))} in all")
    return "\n".join(lines)
