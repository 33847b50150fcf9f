"""The one-shot run's final evaluation: zero-shot tasks on the dense and the pruned model,
their done-records under eval/, metrics.json's "tasks" key, resuming, and the config fields."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import stages.evaluate.evaluate
from stages.config import PruneConfig, PruneRuntime
from stages.evaluate.evaluate import evaluate_run, perplexity_cached, score_tasks
from stages.evaluate.perplexity import causal_lm_forward
from stages.evaluate.tasks.zeroshot import evaluate_tasks
from stages.prune.oneshot import block_records
from stages.run.rundir import verify_record
from tests.samples import TASK_SAMPLES, needs_task_samples, task_spec


def scores_of(model_dir: Path, specs: tuple[str, ...]) -> dict:
    """Task scores computed here from the checkpoint alone, one row per batch (independent of the run's batching)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return evaluate_tasks(
        causal_lm_forward(model), AutoTokenizer.from_pretrained(model_dir), specs, limit=3, batch_size=1, max_length=64
    )


def test_tasks_of_dense_and_pruned_model_land_in_metrics_and_records(evaluated_run):
    cfg, run, metrics, _ = evaluated_run
    assert set(metrics["tasks"]) == {"boolq", "arc_easy"}
    for which, model_dir in (("dense", run.model_dir), ("pruned", run.model)):
        expected = scores_of(model_dir, cfg.eval.tasks)
        for name, exp in expected.items():
            got = metrics["tasks"][name][which]
            assert {k: got[k] for k in exp} == pytest.approx(exp, abs=1e-12)
            assert got["n"] == 3 and got["spec"] == task_spec(name) and got["seconds"] > 0
            record = verify_record(run.root / "eval" / f"tasks-{which}-{name}-n3.json")
            assert record == got
    on_disk = json.loads((run.root / "eval" / "metrics.json").read_text())
    assert on_disk["tasks"] == json.loads(json.dumps(metrics["tasks"]))
    assert on_disk["pydoc"]["windows"] == 2 and on_disk["config"]["task_limit"] == 3


def test_progress_moves_per_model_and_spec(evaluated_run):
    *_, calls = evaluated_run
    assert calls == [
        (1, 6, "dense pydoc perplexity"),
        (2, 6, "pruned pydoc perplexity"),
        (3, 6, "dense boolq"),
        (4, 6, "dense arc_easy"),
        (5, 6, "pruned boolq"),
        (6, 6, "pruned arc_easy"),
    ]


@pytest.fixture()
def own_run(evaluated_run, tmp_path):
    """The evaluated run copied, with its eval records, so that a rerun leaves the shared one as it was."""
    cfg, run, metrics, _ = evaluated_run
    shutil.copytree(run.root, tmp_path / "run", ignore=shutil.ignore_patterns("acts"))
    return cfg.updated(run_dir=str(tmp_path / "run")), replace(run, root=tmp_path / "run"), metrics


def test_rerun_uses_the_records_and_rescores_only_what_changed(own_run, tmp_path, monkeypatch):
    cfg, run, metrics = own_run
    scored: list[str] = []
    real = stages.evaluate.evaluate.evaluate_tasks

    def counting(forward, tok, specs, *args, **kwargs):
        scored.extend(specs)
        return real(forward, tok, specs, *args, **kwargs)

    monkeypatch.setattr(stages.evaluate.evaluate, "evaluate_tasks", counting)
    again = evaluate_run(cfg, run, torch.float32, block_records(run), {"prune": 1.0})
    assert scored == [] and again["tasks"] == metrics["tasks"]
    # the same task from another file is scored again (dense and pruned); an unchanged one is not
    copy = tmp_path / "arc.jsonl"
    shutil.copy(TASK_SAMPLES / "ARC-Easy-Dev.jsonl", copy)
    moved = cfg.updated(tasks=(task_spec("boolq"), f"arc_easy={copy}"))
    changed = evaluate_run(moved, run, torch.float32, block_records(run), {})
    assert scored == [f"arc_easy={copy}"] * 2
    assert changed["tasks"]["arc_easy"]["pruned"]["acc"] == metrics["tasks"]["arc_easy"]["pruned"]["acc"]


def test_records_of_another_dtype_are_evaluated_again(own_run, monkeypatch):
    """Perplexity and task records hold the dtype and device kind they were computed in: a run resumed
    in another dtype (the same run directory, e.g. an older run before the dtype was pinned) recomputes."""
    cfg, run, _ = own_run
    calls = []
    real_ppl, real_tasks = stages.evaluate.evaluate.blockwise_perplexity, stages.evaluate.evaluate.evaluate_tasks
    monkeypatch.setattr(
        stages.evaluate.evaluate, "blockwise_perplexity", lambda *a, **k: (calls.append("ppl"), real_ppl(*a, **k))[1]
    )
    monkeypatch.setattr(
        stages.evaluate.evaluate, "evaluate_tasks", lambda *a, **k: (calls.append("task"), real_tasks(*a, **k))[1]
    )
    cfg = cfg.updated(cache=False)  # the records of this run directory alone
    evaluate_run(cfg, run, torch.float32, block_records(run), {})
    assert calls == []
    bf16 = evaluate_run(cfg, run, torch.bfloat16, block_records(run), {})
    assert calls.count("ppl") == 2 * len(cfg.eval.specs) and calls.count("task") == 2 * len(cfg.eval.tasks)
    record = json.loads((run.root / "eval" / f"tasks-pruned-{next(iter(bf16['tasks']))}-n3.json").read_text())
    assert (record["dtype"], record["device"]) == ("bfloat16", "cpu")


def test_the_dense_evaluation_is_shared_across_run_directories(tiny_llama_dir, tmp_path, monkeypatch):
    """A second run of the same dense checkpoint with the same settings finds its perplexity in the shared
    cache; other windows, another dtype, --no-cache or a changed checkpoint compute it."""
    monkeypatch.setenv("SPARSEGPT_EVAL_CACHE", str(tmp_path / "shared"))
    calls = []
    real = stages.evaluate.evaluate.blockwise_perplexity
    monkeypatch.setattr(
        stages.evaluate.evaluate, "blockwise_perplexity", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)

    def ppl(run: str, windows: int = 2, dtype=torch.float32, cache: bool = True) -> dict:
        runtime = PruneRuntime(progress=False, cache=cache)
        record = tmp_path / run / "dense.json"
        return perplexity_cached(model, "pydoc", 32, windows, record, "dense", dtype, 2, runtime, dense=True)

    first = ppl("a")
    assert len(calls) == 1 and ppl("b") == first and len(calls) == 1  # run b: from the shared cache
    assert (tmp_path / "b" / "dense.json").is_file()  # the run directory gets its own copy
    ppl("c", windows=3)
    ppl("d", dtype=torch.bfloat16)
    ppl("e", cache=False)
    assert len(calls) == 4
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] += 1.0
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert ppl("f")["ppl"] != first["ppl"] and len(calls) == 5


def test_two_runs_needing_the_same_dense_evaluation_at_once_compute_it_once(tiny_llama_dir, tmp_path, monkeypatch):
    """Sweep workers start their points together: the second waits on the entry's lock and reads the first's
    record instead of computing the same perplexity again."""
    monkeypatch.setenv("SPARSEGPT_EVAL_CACHE", str(tmp_path / "shared"))
    started, calls = threading.Event(), []
    real = stages.evaluate.evaluate.blockwise_perplexity

    def slow(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        started.set()
        time.sleep(1.0)  # the other run arrives while this one computes
        return real(*a, **k)

    monkeypatch.setattr(stages.evaluate.evaluate, "blockwise_perplexity", slow)
    results: dict[str, dict] = {}

    def ppl(run: str) -> None:
        runtime = PruneRuntime(progress=False)
        record = tmp_path / run / "dense.json"
        results[run] = perplexity_cached(
            tiny_llama_dir, "pydoc", 32, 2, record, "dense", torch.float32, 2, runtime, dense=True
        )

    first = threading.Thread(target=ppl, args=("a",))
    first.start()
    assert started.wait(60)
    ppl("b")
    first.join()
    assert len(calls) == 1 and results["a"] == results["b"]


def test_a_corrupt_or_unwritable_shared_cache_is_warned_about_and_worked_around(
    tiny_llama_dir, tmp_path, monkeypatch, caplog
):
    """A shared record that fails verification is computed again (a warning); a cache folder that cannot be
    written is skipped with one warning, and the run's own records are still written."""
    import stages.evaluate.cache as cache

    shared = tmp_path / "shared"
    monkeypatch.setenv("SPARSEGPT_EVAL_CACHE", str(shared))
    monkeypatch.setattr(cache, "_unwritable", set())
    calls = []
    real = stages.evaluate.evaluate.blockwise_perplexity
    monkeypatch.setattr(
        stages.evaluate.evaluate, "blockwise_perplexity", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )

    def ppl(run: str, windows: int = 2) -> dict:
        record = tmp_path / run / "dense.json"
        runtime = PruneRuntime(progress=False)
        return perplexity_cached(
            tiny_llama_dir, "pydoc", 32, windows, record, "dense", torch.float32, 2, runtime, dense=True
        )

    first = ppl("a")
    (entry,) = shared.glob("ppl-*.json")
    entry.write_text(entry.read_text()[:-20])  # truncated, as a killed writer without atomic renames leaves it
    with caplog.at_level(logging.WARNING, logger="sparsegpt.evaluate"):
        assert ppl("b")["ppl"] == first["ppl"] and len(calls) == 2
    assert f"the shared dense evaluation {entry} failed verification; it is computed again" in caplog.text
    caplog.clear()
    shutil.rmtree(shared)
    shared.write_text("a file where the cache folder should be")  # writing under it fails, as read-only does
    with caplog.at_level(logging.WARNING, logger="sparsegpt.evaluate"):
        ppl("c")
        ppl("d", windows=3)
    assert caplog.text.count("cannot write the dense-evaluation cache") == 1
    assert (tmp_path / "c" / "dense.json").is_file() and (tmp_path / "d" / "dense.json").is_file()


@needs_task_samples
def test_dense_task_scores_are_shared_across_run_directories(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGPT_EVAL_CACHE", str(tmp_path / "shared"))
    scored = []
    real = stages.evaluate.evaluate.evaluate_tasks
    monkeypatch.setattr(
        stages.evaluate.evaluate,
        "evaluate_tasks",
        lambda m, t, specs, *a, **k: (scored.extend(specs), real(m, t, specs, *a, **k))[1],
    )
    spec = task_spec("boolq")

    def scores(run: str, shared: bool = True, limit: int = 2) -> dict:
        record = lambda name: tmp_path / run / f"tasks-{name}.json"  # noqa: E731
        return score_tasks(tiny_llama_dir, [spec], limit, cache=record, shared=shared)["boolq"]

    first = scores("a")
    assert scores("b") == first and scored == [spec]  # run b: from the shared cache, copied into its records
    assert (tmp_path / "b" / "tasks-boolq.json").is_file()
    scores("c", shared=False)
    scores("d", limit=3)
    assert scored == [spec] * 3


def test_evaluate_run_keeps_the_positional_signature_without_tasks(own_run):
    cfg, run, metrics = own_run
    out = evaluate_run(cfg.updated(tasks=()), run, torch.float32, block_records(run), {})
    assert "tasks" not in out and out["pydoc"] == metrics["pydoc"]


@needs_task_samples
def test_task_fields_are_checked_and_not_part_of_the_identity():
    cfg = PruneConfig.of(tasks=[task_spec("boolq")], task_limit=5)
    assert cfg.eval.tasks == (task_spec("boolq"),) and cfg.identity() == PruneConfig().identity()
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        PruneConfig.of(tasks=("mmlu",))
    with pytest.raises(ValueError, match="task file for piqa not found"):
        PruneConfig.of(tasks=("piqa=/no/such.jsonl",))
    with pytest.raises(ValueError, match="unique"):
        PruneConfig.of(tasks=(task_spec("boolq"), task_spec("boolq")))
    with pytest.raises(ValueError, match=r"task_limit \(--limit\) must be a positive integer, got 0"):
        PruneConfig.of(task_limit=0)


@pytest.mark.device
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_blockwise_perplexity_head_in_chunks_equals_whole_model(arch, tiny_model_factory, monkeypatch, device):
    """The head runs a few positions at a time (here 5, so every window spans several chunks,
    one of them short); the perplexity equals exp(mean window loss) of the whole model."""
    model_dir = tiny_model_factory(arch)
    windows = torch.randint(3, 128, (3, 23), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(windows).logits
    losses = (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="none"
        )
        .view(3, 22)
        .mean(dim=1)
    )
    expected = float(torch.exp(losses.double().mean()))
    calls = []
    real_nll = stages.evaluate.evaluate.window_nll
    monkeypatch.setattr(
        stages.evaluate.evaluate, "window_nll", lambda head, h, ids: calls.append(5) or real_nll(head, h, ids, 5)
    )
    got = stages.evaluate.evaluate.blockwise_perplexity(model_dir, windows, device=device, batch_size=2)
    assert calls == [5, 5, 5]
    assert got.windows == 3 and got.seqlen == 23
    assert got.ppl == pytest.approx(expected, rel=1e-5)
