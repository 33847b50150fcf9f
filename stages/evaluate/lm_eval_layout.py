"""Evaluation results in lm-evaluation-harness's results layout (`--out results.json`).

Tools and leaderboards read lm-eval's `results.json`: `{"results": {task: {"acc,none": ..,
"acc_stderr,none": .., ...}}, "versions": .., "n-shot": .., "higher_is_better": .., "n-samples": ..,
"config": ..}`. Task scores are lm-eval's own (same prompts and metrics, `stages.evaluate.tasks`),
under lm-eval's task names (LAMBADA's OpenAI file is `lambada_openai`, StoryCloze 2016 is
`storycloze_2016`); standard errors are lm-eval's for a mean of 0/1 scores,
`sqrt(p (1 - p) / (n - 1))`. Perplexity over this project's fixed windows is not lm-eval's
`wikitext` (word perplexity over whole documents), so it goes beside them under its own label with
a `token_perplexity,none` metric.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.run.rundir import atomic_write_text

LM_EVAL_NAMES = {"lambada": "lambada_openai", "storycloze": "storycloze_2016"}
"""This project's task name -> lm-eval's, where they differ."""
VERSIONS = {"boolq": 2.0}
"""lm-eval task versions other than 1.0 (its YAMLs' `metadata.version`)."""


def stderr(p: float, n: int) -> float | str:
    """lm-eval's standard error of a mean of ``n`` 0/1 scores with mean ``p`` (sample variance)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else "N/A"


def task_entry(name: str, scores: Mapping[str, Any]) -> dict:
    """One task's `results` entry from its scores (`acc`, `acc_norm` or LAMBADA's `ppl`, and `n`)."""
    entry: dict[str, Any] = {"alias": LM_EVAL_NAMES.get(name, name)}
    if "ppl" in scores:
        entry["perplexity,none"] = scores["ppl"]
        entry["perplexity_stderr,none"] = "N/A"
    for metric in ("acc", "acc_norm"):
        if metric in scores:
            entry[f"{metric},none"] = scores[metric]
            entry[f"{metric}_stderr,none"] = stderr(scores[metric], int(scores["n"]))
    return entry


def lm_eval_results(
    perplexity: Mapping[str, Mapping[str, Any]],
    tasks: Mapping[str, Mapping[str, Any]],
    model: str,
    config: Mapping[str, Any],
) -> dict:
    """The layout of one model's scores: ``perplexity`` (label -> {ppl, windows, seqlen}), ``tasks``
    (name -> scores), ``model`` (its path or id) and more ``config`` entries (dtype, device, limit, ...)."""
    results: dict[str, dict] = {}
    higher: dict[str, dict] = {}
    for name, scores in tasks.items():
        key = LM_EVAL_NAMES.get(name, name)
        results[key] = task_entry(name, scores)
        higher[key] = {m: m != "perplexity" for m in ("acc", "acc_norm", "perplexity") if f"{m},none" in results[key]}
    for label, res in perplexity.items():
        results[label] = {
            "alias": label,
            "token_perplexity,none": res["ppl"],
            "token_perplexity_stderr,none": "N/A",
            "windows": res["windows"],
            "seqlen": res["seqlen"],
        }
        higher[label] = {"token_perplexity": False}
    names = [LM_EVAL_NAMES.get(n, n) for n in tasks]
    return {
        "results": results,
        "versions": {n: VERSIONS.get(n, 1.0) for n in names},
        "n-shot": {n: 0 for n in names},
        "higher_is_better": higher,
        "n-samples": {LM_EVAL_NAMES.get(n, n): {"effective": int(s["n"])} for n, s in tasks.items()},
        "config": {"model": "hf", "model_args": f"pretrained={model}", **config},
        "date": time.time(),
    }


def write_results(path: Path | str, layout: Mapping[str, Any]) -> Path:
    """Write ``layout`` as JSON to ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(layout, indent=2) + "\n")
    return path


def dense_path(path: Path | str) -> Path:
    """Where a prune writes the dense model's results next to the pruned model's ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.dense{path.suffix or '.json'}")


def prune_layouts(metrics: Mapping[str, Any], dense: str, pruned: str, config: Mapping[str, Any]) -> tuple[dict, dict]:
    """(dense, pruned) layouts from a one-shot run's `eval/metrics.json` (label -> {ppl, dense_ppl, windows,
    seqlen}; "tasks" -> name -> {"dense": scores, "pruned": scores})."""
    ppl = {k: v for k, v in metrics.items() if isinstance(v, Mapping) and "dense_ppl" in v}
    tasks = metrics.get("tasks") or {}
    layouts = []
    for which, model, key in (("dense", dense, "dense_ppl"), ("pruned", pruned, "ppl")):
        windows = {k: {"ppl": v[key], "windows": v["windows"], "seqlen": v["seqlen"]} for k, v in ppl.items()}
        scores = {name: t[which] for name, t in tasks.items()}
        layouts.append(lm_eval_results(windows, scores, model, config))
    return layouts[0], layouts[1]
