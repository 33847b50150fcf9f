"""Scores in lm-evaluation-harness's results layout."""

from __future__ import annotations

import math
import statistics

import pytest

from stages.evaluate.lm_eval_layout import dense_path, lm_eval_results


def test_tasks_take_lm_evals_names_metrics_and_standard_errors():
    tasks = {
        "lambada": {"acc": 0.5, "ppl": 20.0, "n": 4},
        "arc_easy": {"acc": 0.25, "acc_norm": 0.75, "n": 4},
        "storycloze": {"acc": 1.0, "n": 1},
    }
    layout = lm_eval_results({"wikitext2": {"ppl": 30.5, "windows": 8, "seqlen": 512}}, tasks, "m", {"limit": 4})
    res = layout["results"]
    assert set(res) == {"lambada_openai", "arc_easy", "storycloze_2016", "wikitext2"}
    assert res["lambada_openai"]["perplexity,none"] == 20.0 and res["lambada_openai"]["acc,none"] == 0.5
    sample = [1.0, 0.0, 0.0, 0.0]  # arc_easy's acc 0.25 over 4 items
    assert res["arc_easy"]["acc_stderr,none"] == pytest.approx(statistics.stdev(sample) / math.sqrt(4))
    assert res["arc_easy"]["acc_norm,none"] == 0.75
    assert res["storycloze_2016"]["acc_stderr,none"] == "N/A"  # one item: no sample variance
    assert res["wikitext2"]["token_perplexity,none"] == 30.5 and "word_perplexity,none" not in res["wikitext2"]
    assert layout["higher_is_better"]["lambada_openai"] == {"acc": True, "perplexity": False}
    assert layout["config"] == {"model": "hf", "model_args": "pretrained=m", "limit": 4}
    assert layout["versions"] == {"lambada_openai": 1.0, "arc_easy": 1.0, "storycloze_2016": 1.0}


def test_the_dense_results_sit_beside_the_pruned():
    assert dense_path("out/r.json").as_posix() == "out/r.dense.json"
    assert dense_path("r").as_posix() == "r.dense.json"
