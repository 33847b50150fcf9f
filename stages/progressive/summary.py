"""The progressive run's summary: dense perplexities, one row per finished round, final task scores.

`summary(cfg)` reads the records on disk; `write_summary` writes RUN_DIR/summary.json and
summary.md (after every round); `summary_markdown` is the round table the CLI prints.
"""

from __future__ import annotations

from stages.data.tasks import parse_task_specs
from stages.progressive.config import ProgressiveConfig
from stages.progressive.paths import eval_key, round_done
from stages.run.rundir import atomic_path, atomic_write_json, verify_record


def summary(cfg: ProgressiveConfig) -> dict:
    """Dense perplexities and one row per finished round, in schedule order."""
    dense = {}
    for spec in cfg.eval.specs:
        label, key = eval_key(cfg, spec)
        rec = verify_record(cfg.root() / "eval" / f"dense-{key}.json")
        if rec is not None:
            dense[label] = {k: rec[k] for k in ("ppl", "windows", "seqlen")}
    rounds = []
    for k in range(1, cfg.rounds + 1):
        rec = round_done(cfg, k)
        if rec is not None:
            rounds.append({key: v for key, v in rec.items() if key != "files"})
    tasks: dict[str, dict] = {}
    for name in (t.name for t in parse_task_specs(cfg.eval.tasks)):
        for which in ("dense", "final"):
            rec = verify_record(cfg.root() / "eval" / f"tasks-{which}-{name}-n{cfg.eval.task_limit or 'all'}.json")
            if rec is not None:
                tasks.setdefault(name, {})[which] = {k: v for k, v in rec.items() if k != "files"}
    return {
        "schedule": list(cfg.schedule),
        "dense": dense,
        "rounds": rounds,
        "complete": len(rounds) == cfg.rounds,
        "tasks": tasks,
    }


def summary_markdown(s: dict) -> str:
    """The round-by-round table: target, achieved sparsity, perplexity before/after fine-tuning, tokens, time."""
    labels = list(s["dense"]) or sorted({label for r in s["rounds"] for label in r["ppl_after"]})
    head = ["round", "target", "sparsity"] + [f"{lab} ppl before -> after FT" for lab in labels] + ["tokens", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if s["dense"]:
        lines.append("| dense | 0 | 0 | " + " | ".join(f"{s['dense'][lab]['ppl']:.2f}" for lab in labels) + " | | |")
    for r in s["rounds"]:
        cells = [f"{r['ppl_before'][lab]:.2f} -> {r['ppl_after'][lab]:.2f}" for lab in labels]
        lines.append(
            f"| {r['round']} | {r['pattern']} | {r['sparsity']:.4f} | "
            + " | ".join(cells)
            + f" | {r['tokens']} | {r['seconds']:.0f} s |"
        )
    if s.get("tasks"):
        lines += ["", "| task | items | metric | dense | final |", "|---|---|---|---|---|"]
        for name, m in s["tasks"].items():
            if "dense" in m and "final" in m:
                lines += [
                    f"| {name} | {m['final']['n']} | {k} | {m['dense'][k]:.4f} | {m['final'][k]:.4f} |"
                    for k in ("acc", "acc_norm", "ppl")
                    if k in m["final"]
                ]
    done = len(s["rounds"])
    lines.append(f"\n{done} of {len(s['schedule'])} rounds done" + (" (schedule complete)" if s["complete"] else ""))
    return "\n".join(lines)


def write_summary(cfg: ProgressiveConfig) -> dict:
    s = summary(cfg)
    atomic_write_json(cfg.root() / "summary.json", s)
    with atomic_path(cfg.root() / "summary.md") as tmp:
        tmp.write_text(summary_markdown(s) + "\n", encoding="utf-8")
    return s
