"""Progressive prune-and-finetune rounds on a tiny Llama (no Prefect)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stages.finetune.finetune as finetune_mod
from stages.export.export import export_run
from stages.progressive.check import check
from stages.progressive.masks import mask_records
from stages.progressive.rounds import (
    ProgressiveConfig,
    RoundPaths,
    parse_schedule,
    read_mask,
    run_progressive,
    summary_markdown,
)
from stages.report.status import run_status
from stages.run.rundir import RunError, verify_record
from tests.samples import needs_task_samples, task_spec


def tiny_progressive(model_dir: Path, run_dir: Path, **kw) -> ProgressiveConfig:
    base = dict(
        model=str(model_dir),
        run_dir=str(run_dir),
        schedule="0.3,0.5,0.7",
        calib="pydoc",
        nsamples=4,
        seqlen=32,
        blocksize=16,
        batch_size=4,
        finetune_data="pydoc",
        tokens_per_round=3 * 2 * 32,
        micro_batch_size=2,
        lr=1e-3,
        checkpoint_every=1,
        eval=("pydoc",),
        eval_windows=2,
        progress=False,
    )
    return ProgressiveConfig.of(**{**base, **kw})


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_schedule_is_parsed_and_checked():
    assert parse_schedule("0.5, 0.6,0.8") == ("0.5", "0.6", "0.8")
    assert parse_schedule([0.5, "0.7"]) == ("0.5", "0.7")
    assert parse_schedule("1:4,2:4") == ("1:4", "2:4")
    with pytest.raises(ValueError, match="must rise"):
        parse_schedule("0.6,0.5")
    with pytest.raises(ValueError, match="mixes sparsities and N:M"):
        parse_schedule("0.25,2:4")
    with pytest.raises(ValueError, match="share one M"):
        parse_schedule("1:4,4:8")
    with pytest.raises(ValueError, match="neither a sparsity"):
        parse_schedule("0.5,lots")
    with pytest.raises(ValueError, match="empty"):
        parse_schedule("")
    with pytest.raises(ValueError, match="sparsity"):
        parse_schedule("0.5,1.0")
    with pytest.raises(ValueError, match="loss weight kl must be a finite number >= 0"):
        ProgressiveConfig.of(kl_weight=-1.0)
    with pytest.raises(ValueError, match="rounds_per_run"):
        ProgressiveConfig.of(rounds_per_run=0)


def test_rounds_grow_the_mask_keep_it_through_finetuning_and_advance_per_run(tiny_llama_dir, tmp_path):
    cfg = tiny_progressive(tiny_llama_dir, tmp_path / "p", rounds_per_run=2)
    first = run_progressive(cfg)
    assert first.done_now == [1, 2] and first.remaining == 1
    assert "run again to continue" in first.message
    status = run_status(tmp_path / "p")
    assert (
        re.search(r"round 1 \(0\.3\): done, sparsity 0\.\d{4}, 192 tokens", status) and "round 2 (0.5): done" in status
    )
    assert "round 3 (0.7): not started" in status
    with pytest.raises(RunError, match=r"has finished 2 of its 3 rounds; rerun its progressive command"):
        export_run(tmp_path / "p")
    assert not (tmp_path / "p" / "export-hf").exists()
    second = run_progressive(cfg)
    assert second.done_now == [3] and second.remaining == 0
    third = run_progressive(cfg)
    assert third.done_now == [] and "nothing to do" in third.message

    dense = weights(tiny_llama_dir)
    previous: dict[str, torch.Tensor] | None = None
    rows = json.loads((tmp_path / "p" / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for k, target in enumerate((0.3, 0.5, 0.7), start=1):
        paths = RoundPaths(cfg.round_dir(k))
        mask = read_mask(paths.mask)
        assert len(mask) == 3 * 7  # 3 blocks x (q, k, v, o, gate, up, down)
        pruned = weights(paths.prune / "model")
        tuned = weights(paths.finetune / "model")
        for name, m in mask.items():
            # exact per-layer count, the mask is the pruned model's zeros, fine-tuning kept them zero
            assert int(m.sum()) == round(m.numel() * target), name
            assert torch.equal(m, pruned[name] == 0) and torch.equal(m, tuned[name] == 0), name
            if previous is not None:
                assert not (previous[name] & ~m).any(), f"round {k} revived pruned weights of {name}"
        moved = [n for n in mask if not torch.equal(pruned[n], tuned[n])]
        assert len(moved) == len(mask), "fine-tuning changed every pruned layer's kept weights"
        assert rows[k - 1]["sparsity"] == pytest.approx(target, abs=1e-3)
        assert rows[k - 1]["tokens"] == cfg.finetune.tokens and rows[k - 1]["steps"] == 3
        before = verify_record(paths.eval / "before-pydoc-s32-w2.json")["ppl"]
        after = verify_record(paths.eval / "after-pydoc-s32-w2.json")["ppl"]
        assert rows[k - 1]["ppl_before"] == {"pydoc": before} and rows[k - 1]["ppl_after"] == {"pydoc": after}
        assert not (paths.prune / "acts").exists() and not (paths.prune / "blocks").exists()
        counted = {
            f"model.layers.{r['block']}.{n}.weight": st
            for r in mask_records(paths.mask)
            for n, st in r["layers"].items()
        }
        assert counted.keys() == mask.keys()
        for name, m in mask.items():
            assert counted[name] == {"shape": list(m.shape), "sparsity": pytest.approx(float(m.float().mean()))}
        previous = mask
    with pytest.raises(RunError, match="progressive run, whose rounds do not quantize"):
        export_run(tmp_path / "p", "compressed-tensors")
    out = export_run(tmp_path / "p")
    assert {f.name for f in out.iterdir()} >= {f.name for f in (paths.finetune / "model").iterdir()}
    assert json.loads((out / "sparsity.json").read_text())["overall"] == pytest.approx(rows[2]["sparsity"])
    assert set(dense) == set(tuned)  # the round model is a whole checkpoint
    shared = tmp_path / "p" / "data" / "finetune-s32.arrow"  # tokenized once, linked into every round
    assert all(
        (cfg.round_dir(k) / "finetune" / "data" / "tokens.arrow").stat().st_ino == shared.stat().st_ino
        for k in (1, 2, 3)
    )
    md = (tmp_path / "p" / "summary.md").read_text()
    assert "3 of 3 rounds done (schedule complete)" in md and md.count("\n| ") == 4  # dense + 3 rounds
    assert summary_markdown(second.summary) + "\n" == md


def test_resumed_finetune_gives_the_same_round_as_an_uninterrupted_one(tiny_llama_dir, tmp_path, monkeypatch):
    whole = tiny_progressive(tiny_llama_dir, tmp_path / "whole", schedule="0.4,0.6", eval=())
    run_progressive(whole)

    crashed = tiny_progressive(tiny_llama_dir, tmp_path / "crashed", schedule="0.4,0.6", eval=())
    real_step, calls = finetune_mod.train_step, {"n": 0}

    def crash_in_round_two(tr):
        calls["n"] += 1
        if calls["n"] == 5:  # round 1 took 3 steps; this is round 2's second step (one checkpoint written)
            raise KeyboardInterrupt("simulated crash")
        return real_step(tr)

    monkeypatch.setattr(finetune_mod, "train_step", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run_progressive(crashed)
    assert verify_record(RoundPaths(crashed.round_dir(1)).record) is not None
    assert (crashed.round_dir(2) / "finetune" / "ckpt").is_dir()
    monkeypatch.setattr(finetune_mod, "train_step", real_step)
    assert run_progressive(crashed).done_now == [2]

    a, b = weights(whole.round_model(2)), weights(crashed.round_model(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_while_pruning_fine_tuning_and_evaluating_then_resume_gives_the_same_rounds(tiny_llama_dir, tmp_path):
    """One run directory through a chain of real SIGKILLs inside round 2, then a run to the end."""
    reference = tiny_progressive(tiny_llama_dir, tmp_path / "whole", schedule="0.4,0.6")
    run_progressive(reference)
    cfg = tiny_progressive(tiny_llama_dir, tmp_path / "killed", schedule="0.4,0.6")
    driver = Path(__file__).with_name("progressive_kill_driver.py")
    env = {**os.environ, "PYTHONPATH": str(driver.parents[3]), "TOKENIZERS_PARALLELISM": "false"}
    kills = (
        "rounds/round_02/prune/blocks/block_001.json",  # pruning, between blocks
        "rounds/round_02/finetune/ckpt/step_00000002/train_state.pt",  # fine-tuning, mid-checkpoint
        "rounds/round_02/eval/before-pydoc-s32-w2.json",  # evaluating
    )
    for point in (*[f"after:{k}" for k in kills], "none"):
        proc = subprocess.run(
            [sys.executable, str(driver), json.dumps(cfg.to_dict()), point],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if point == "none":
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert "finished round 2 of 2" in proc.stdout
        else:
            assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.returncode}\n{proc.stderr[-2000:]}"
            assert (cfg.root() / point.split(":", 1)[1]).is_file()
            assert verify_record(RoundPaths(cfg.round_dir(2)).record) is None
    for k in (1, 2):
        a, b = weights(reference.round_model(k)), weights(cfg.round_model(k))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"round {k}"
    ref_rows = json.loads((tmp_path / "whole" / "summary.json").read_text())["rounds"]
    rows = json.loads((tmp_path / "killed" / "summary.json").read_text())["rounds"]
    for key in ("sparsity", "ppl_before", "ppl_after", "tokens", "steps", "final_loss"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key


def test_a_different_schedule_is_refused_and_run_settings_may_change(tiny_llama_dir, tmp_path):
    cfg = tiny_progressive(tiny_llama_dir, tmp_path / "p", schedule="0.4,0.6", rounds_per_run=1, eval=())
    run_progressive(cfg)
    with pytest.raises(RunError, match="schedule"):
        run_progressive(tiny_progressive(tiny_llama_dir, tmp_path / "p", schedule="0.4,0.7", eval=()))
    later = tiny_progressive(tiny_llama_dir, tmp_path / "p", schedule="0.4,0.6", rounds_per_run=None, eval=())
    assert run_progressive(later).done_now == [2]


@needs_task_samples
def test_nm_schedule_grows_one_pattern_into_the_next_without_finetuning(tiny_llama_dir, tmp_path):
    cfg = tiny_progressive(
        tiny_llama_dir,
        tmp_path / "p",
        schedule="1:4,2:4",
        tokens_per_round=0,
        tasks=(task_spec("arc_easy"),),
        task_limit=3,
    )
    out = run_progressive(cfg)
    one, two = read_mask(RoundPaths(cfg.round_dir(1)).mask), read_mask(RoundPaths(cfg.round_dir(2)).mask)
    for name in one:
        groups1, groups2 = one[name].reshape(one[name].shape[0], -1, 4), two[name].reshape(two[name].shape[0], -1, 4)
        assert (groups1.sum(-1) == 1).all() and (groups2.sum(-1) == 2).all(), name
        assert not (one[name] & ~two[name]).any(), name
    assert not (cfg.round_dir(1) / "finetune").exists()
    row = json.loads((tmp_path / "p" / "summary.json").read_text())["rounds"][1]
    assert row["ppl_before"] == row["ppl_after"] and row["tokens"] == 0
    assert Path(row["model"]) == cfg.round_dir(2) / "prune" / "model"
    # the final evaluation scores the tasks on the dense and the final model, cached under RUN_DIR/eval/
    tasks = out.summary["tasks"]["arc_easy"]
    assert tasks["dense"]["n"] == tasks["final"]["n"] == 3
    final = verify_record(tmp_path / "p" / "eval" / "tasks-final-arc_easy-n3.json")
    assert final["acc"] == tasks["final"]["acc"] and final["acc_norm"] == tasks["final"]["acc_norm"]
    assert "| arc_easy | 3 | acc_norm |" in (tmp_path / "p" / "summary.md").read_text()


def test_cli_rejects_bad_progressive_settings_with_one_line(tmp_path, capsys):
    from flows.cli import main

    assert main(["progressive", "m", "--run-dir", str(tmp_path / "p"), "--schedule", "0.7,0.5"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: schedule targets must rise round by round (the mask only grows), got 0.7,0.5"
    )
    assert main(["progressive", "m", "--run-dir", str(tmp_path / "p"), "--schedule", "0.5", "--nm", "2:4"]) == 2
    assert "either --schedule or --nm" in capsys.readouterr().err
    assert main(["progressive", "m", "--run-dir", str(tmp_path / "p"), "--kl-weight", "-1"]) == 2
    assert "loss weight kl must be a finite number >= 0" in capsys.readouterr().err
    assert main(["progressive", "m", "--run-dir", str(tmp_path / "p"), "--export", "compressed-tensors"]) == 2
    assert "progressive rounds do not quantize; use --export hf or gguf" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_keep_pruned_from_older_run_directories():
    """Run directories written before keep_pruned existed hold no such key: they mean keep_pruned=False."""
    from stages.config import PruneConfig

    old = {k: v for k, v in PruneConfig().identity().items()}
    old["solver"] = {k: v for k, v in old["solver"].items() if k != "keep_pruned"}
    assert PruneConfig.upgrade(old) == PruneConfig().identity()
    assert PruneConfig.upgrade(old) != PruneConfig.of(keep_pruned=True).identity()
    with pytest.raises(ValueError, match="keep_pruned"):
        PruneConfig.of(keep_pruned=True, method="wanda")


def test_recovery_reconstruct_trains_every_block_toward_the_dense_model_without_finetuning(tiny_llama_dir, tmp_path):
    cfg = tiny_progressive(
        tiny_llama_dir, tmp_path / "p", schedule="0.5,0.7", recovery="reconstruct", reconstruct_lr=1e-3
    )
    run_progressive(cfg)
    for k in (1, 2):
        prune = RoundPaths(cfg.round_dir(k)).prune
        stored = json.loads((prune / "run.json").read_text())["config"]["reconstruct"]
        assert stored["enabled"] and stored["teacher"] == str(tiny_llama_dir)
        assert not (cfg.round_dir(k) / "finetune").exists() and not (prune / "dense").exists()
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())["rounds"]
    assert [r["tokens"] for r in summary] == [0, 0]
    assert Path(summary[1]["model"]) == cfg.round_dir(2) / "prune" / "model"
    one, two = read_mask(RoundPaths(cfg.round_dir(1)).mask), read_mask(RoundPaths(cfg.round_dir(2)).mask)
    assert all(not (one[name] & ~two[name]).any() for name in one)  # the mask only grew through training


def test_recovery_distill_that_cannot_fit_is_refused_before_any_work(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import stages.progressive.check as check
    from flows.cli import main

    monkeypatch.setattr(check, "device_bytes", lambda device: 1024)
    args = ["progressive", str(tiny_llama_dir), "--run-dir", str(tmp_path / "p"), "--seqlen", "32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --recovery distill distils the whole model: ")
    assert err.rstrip().endswith("use --recovery reconstruct (one block in memory)")
    assert not (tmp_path / "p").exists()
    check.check(tiny_progressive(tiny_llama_dir, tmp_path / "r", recovery="reconstruct"))  # one block: no such limit


def test_rounds_prune_on_data_parallel_ranks(tiny_llama_dir, tmp_path, monkeypatch):
    """`progressive --nproc 2`: every round's prune runs on two data-parallel ranks (the mask still only grows)
    and its fine-tune on two FSDP ranks. With --recovery reconstruct the ranks are refused before any work."""
    import stages.prune.parallel as parallel

    ranks, real = [], parallel.prune_blocks_parallel

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        records = real(*a, **k)
        ranks.append({r.get("ranks") for r in records})
        return records

    monkeypatch.setattr(parallel, "prune_blocks_parallel", spy)
    cfg = tiny_progressive(tiny_llama_dir, tmp_path / "p", schedule="0.3,0.5", nsamples=32, nproc=2)
    assert cfg.prune_config(2).runtime.nproc == 2
    run_progressive(cfg)
    assert ranks == [{2}, {2}]  # both rounds' blocks (their records are dropped once a round is done)
    one, two = read_mask(RoundPaths(cfg.round_dir(1)).mask), read_mask(RoundPaths(cfg.round_dir(2)).mask)
    assert all(not (one[n] & ~two[n]).any() for n in one)
    for k in (1, 2):
        tuned = json.loads((RoundPaths(cfg.round_dir(k)).finetune / "finetune.json").read_text())
        assert tuned["ranks"] == 2 and len(tuned["peak"]) == 2
    with pytest.raises(ValueError, match="--nproc 2 does not run --reconstruct yet"):
        check(tiny_progressive(tiny_llama_dir, tmp_path / "r", nsamples=32, nproc=2, recovery="reconstruct"))


def test_distill_need_is_split_over_gpu_ranks(tiny_llama_dir, tmp_path, monkeypatch):
    """With --nproc N on GPUs each rank holds 1/N of the 20 bytes a parameter; on a CPU the ranks share one
    memory, so the need stays whole."""
    import stages.progressive.check as check

    need = check.parameter_count(tiny_llama_dir) * check.DISTILL_BYTES_PER_PARAMETER
    monkeypatch.setattr(check, "device_bytes", lambda device: need * 0.4)

    def fits(device: str, nproc: int) -> None:
        check.check_distill_fits(
            tiny_progressive(tiny_llama_dir, tmp_path / "p", device=device, nproc=nproc), tiny_llama_dir
        )

    fits("cuda", 3)  # a third of the need on each GPU
    with pytest.raises(ValueError, match=r"parameters in 2 shards need .* or more GPUs \(--nproc\)$"):
        fits("cuda", 2)
    with pytest.raises(ValueError, match=r"parameters need .*; use --recovery reconstruct \(one block in memory\)$"):
        fits("cpu", 3)
