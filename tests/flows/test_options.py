"""The CLI, the README's option tables and run identity all come from the config tree.

Options are generated from the dataclasses (flags, choices, defaults, help); the
README's tables equal `python -m flows.options`; flat names are unique and are the
keys of an older flat `run.json`, which still resumes; parsing a command line gives
the config a test builds by hand.
"""

import argparse
import re
from pathlib import Path

import pytest

from flows.options import COMMANDS, add_options, build, command_config, readme_tables
from stages.config import PruneConfig
from stages.config.tree import flat_names, leaves
from stages.progressive.config import ProgressiveConfig

REPO = Path(__file__).resolve().parents[2]


def parse(command: str, argv: list[str]):
    parser = argparse.ArgumentParser()
    add_options(parser, command_config(command))
    return build(command_config(command), parser.parse_args(argv))


def test_readme_tables_are_generated_from_the_tree():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for block in re.split(r"\n(?=<!-- options:)", readme_tables().strip()):
        assert block in readme, f"README's options table is stale; paste `python -m flows.options`:\n{block[:200]}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_a_unique_flat_name(command):
    cfg = command_config(command)
    flat_names(type(cfg))  # raises on a shared flat name
    for leaf in leaves(cfg, cli=True):
        assert leaf.help, f"{command}: field {'.'.join(leaf.path)} has no docstring (its --help text)"


def test_command_line_builds_the_tree():
    cfg = parse(
        "prune",
        [
            "m",
            "--run-dir",
            "r",
            "--nm",
            "2:4",
            "--owl-threshold",
            "7",
            "--eval",
            "pydoc",
            "--eval",
            "pydoc",
            "--tasks",
            "piqa,boolq",
            "--tasks",
            "lambada",
            "--limit",
            "3",
            "--no-progress",
            "--batch-size",
            "2",
            "--method",
            "sparsegpt",
        ],
    )
    want = PruneConfig.of(
        model="m",
        run_dir="r",
        nm="2:4",
        owl_threshold=7.0,
        eval=("pydoc", "pydoc"),
        tasks=("piqa", "boolq", "lambada"),
        task_limit=3,
        progress=False,
        batch_size=2,
    )
    assert cfg == want
    assert cfg.solver.owl_threshold == 7.0 and cfg.runtime.batch_size == 2 and cfg.eval.tasks[-1] == "lambada"
    assert parse("prune", ["m", "--run-dir", "r"]) == PruneConfig(model="m", run_dir="r")  # defaults: the dataclasses'
    assert parse("prune", ["m", "--run-dir", "r", "--eval", "none"]) == PruneConfig(model="m", run_dir="r")  # its help
    assert parse("eval", ["m", "--eval", "None", "--eval", "pydoc"]).eval.specs == ("pydoc",)
    prog = parse(
        "progressive",
        [
            "m",
            "--run-dir",
            "p",
            "--schedule",
            "0.5,0.7",
            "--tokens-per-round",
            "0",
            "--kl-weight",
            "0.5",
            "--rounds-per-run",
            "1",
            "--checkpoint-every",
            "5",
        ],
    )
    assert prog.schedule == ("0.5", "0.7") and prog.finetune.tokens == 0 and prog.finetune.kl == 0.5
    assert (prog.runtime.rounds_per_run, prog.runtime.checkpoint_every) == (1, 5)
    with pytest.raises(SystemExit):  # a choice outside the Literal
        parse("prune", ["m", "--run-dir", "r", "--method", "obs"])
    assert parse("eval", ["m", "--eval", "pydoc", "--dtype", "bfloat16"]).runtime.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse("eval", ["m", "--eval", "pydoc", "--dtype", "int8"])
    with pytest.raises(SystemExit):  # solver options a progressive run does not take
        parse("progressive", ["m", "--run-dir", "p", "--wbits", "4"])


def test_identity_leaves_out_eval_and_runtime_and_reads_older_flat_run_json():
    cfg = PruneConfig.of(model="m", run_dir="r", nsamples=6, seqlen=32, nm="2:4", owl_threshold=6.0)
    assert cfg.identity() == cfg.updated(run_dir="x", eval=("pydoc",), device="cuda", batch_size=1).identity()
    assert cfg.identity() != cfg.updated(seed=1).identity()
    assert cfg.identity() == cfg.updated(kernel="triton", device="cuda").identity()  # how, not what
    # run.json's config as the code before the tree wrote it (flat keys, no keep_pruned):
    old = {
        "model": "m",
        "method": "sparsegpt",
        "sparsity": 0.5,
        "nm": "2:4",
        "wbits": 16,
        "calib": "pydoc",
        "nsamples": 6,
        "seqlen": 32,
        "seed": 0,
        "blocksize": 128,
        "percdamp": 0.01,
        "damp_retries": 3,
        "owl": False,
        "owl_lambda": 0.08,
        "owl_threshold": 6.0,
        "trust_remote_code": False,
    }
    assert PruneConfig.upgrade(old) == cfg.identity()
    assert PruneConfig.upgrade({**old, "nsamples": 7}) != cfg.identity()
    prog = ProgressiveConfig.of(model="m", run_dir="p", schedule="0.5,0.6", nsamples=4, tokens_per_round=0)
    old_prog = {
        "model": "m",
        "schedule": ["0.5", "0.6"],
        "calib": "pydoc",
        "nsamples": 4,
        "seqlen": 2048,
        "seed": 0,
        "blocksize": 128,
        "percdamp": 0.01,
        "damp_retries": 3,
        "finetune_data": "pydoc",
        "tokens_per_round": 0,
        "finetune_seqlen": None,
        "micro_batch_size": 4,
        "grad_accum": 1,
        "lr": 0.0001,
        "warmup_steps": 0,
        "lr_schedule": "cosine",
        "min_lr_ratio": 0.1,
        "weight_decay": 0.0,
        "distill": ["kl"],
        "lm_weight": 1.0,
        "temperature": 1.0,
        "finetune_seed": 0,
        "autocast": "none",
        "trust_remote_code": False,
    }
    assert ProgressiveConfig.upgrade(old_prog) == prog.identity()
    assert ProgressiveConfig.upgrade({**old_prog, "distill": ["kl", "squarehead"]}) != prog.identity()
