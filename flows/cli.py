"""The `sparsegpt` command line: prune, eval, progressive, report, status.

    sparsegpt prune MODEL --run-dir runs/x --sparsity 0.5 [--nm 2:4] [--method wanda] [--tasks SPEC,...] ...
    sparsegpt eval MODEL [--eval SPEC ...] [--tasks SPEC,SPEC,...] [--limit N] [--seqlen 2048 --eval-windows N]
    sparsegpt progressive MODEL --run-dir runs/p --schedule 0.5,0.6,0.7,0.8 [--tokens-per-round N] ...
    sparsegpt report runs/x [runs/y ...] [--out DIR]
    sparsegpt status runs/x

Bad input ends with one line `error: ...` naming the problem and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

T0 = time.perf_counter()


def _prefect_env() -> None:
    """Defaults that keep Prefect's start-up small and quiet; a configured server is reused."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    from stages.config import PruneConfig

    p = sub.add_parser("prune", help="prune a model one-shot into a run directory (resumable)")
    p.add_argument("model", help="local HF directory, hub id, or smollm2-135m (embedded default)")
    p.add_argument("--run-dir", required=True, help="run directory; rerun the same command to resume")
    p.add_argument("--method", choices=("sparsegpt", "wanda", "magnitude"), default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nm", default=None, help="semi-structured N:M pattern, e.g. 2:4")
    p.add_argument("--wbits", type=int, default=16, help="joint quantization bits (2-8); 16 = none")
    p.add_argument("--calib", default="pydoc", help="calibration SPEC: wikitext2[=PATH], c4[=PATH], ptb[=PATH], "
                   "text=PATH, jsonl=PATH[:field], parquet=PATH[:field], pydoc (embedded)")
    for name, typ in (("nsamples", int), ("seqlen", int), ("seed", int), ("blocksize", int), ("percdamp", float),
                      ("damp-retries", int), ("batch-size", int), ("keep-acts", int), ("eval-batch-size", int)):
        default = {f.name: f.default for f in fields(PruneConfig)}[name.replace("-", "_")]
        p.add_argument(f"--{name}", type=typ, default=default)
    p.add_argument("--owl", action="store_true", help="OWL per-block sparsity allocation")
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--eval", action="append", default=[], metavar="SPEC", help="evaluation SPEC (repeatable)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="defaults to --seqlen")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    _add_tasks(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", action="append", default=[], metavar="SPEC,SPEC",
                   help="zero-shot tasks: lambada|piqa|arc_easy|arc_challenge|hellaswag|winogrande|boolq|storycloze"
                        "[=PATH], comma-separated (repeatable); a bare NAME loads the hub copy")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")


def _task_specs(values: list[str]) -> tuple[str, ...]:
    """``["piqa=a.jsonl,boolq=b.jsonl", "lambada=c"]`` -> each SPEC, blanks dropped."""
    return tuple(s.strip() for v in values for s in v.split(",") if s.strip())


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on dataset SPECs and zero-shot task scores of a model")
    p.add_argument("model")
    p.add_argument("--eval", action="append", default=[], metavar="SPEC")
    _add_tasks(p)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4, help="windows or task rows per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true")


def _add_progressive(sub: argparse._SubParsersAction) -> None:
    from stages.progressive import ProgressiveConfig

    defaults = {f.name: f.default for f in fields(ProgressiveConfig)}
    p = sub.add_parser("progressive", help="prune-and-finetune rounds toward high sparsity (resumable, schedulable)")
    p.add_argument("model", help="the dense model (also the distillation teacher): directory, hub id or smollm2-135m")
    p.add_argument("--run-dir", required=True, help="run directory; rerun the same command to continue the schedule")
    p.add_argument("--schedule", default=None, help="rising per-round targets, e.g. 0.5,0.6,0.7,0.8 or 1:4,2:4 "
                   f"(default {','.join(defaults['schedule'])})")
    p.add_argument("--nm", default=None, help="N:M ramp: --nm 2:4 means --schedule 1:4,2:4")
    p.add_argument("--calib", default=defaults["calib"], help="calibration SPEC of every round")
    p.add_argument("--finetune-data", default=defaults["finetune_data"], help="fine-tuning SPEC (c4, c4=PATH, text=PATH, pydoc, ...)")
    p.add_argument("--distill", default=",".join(defaults["distill"]), help="kl, squarehead or kl,squarehead")
    for name, typ in (("nsamples", int), ("seqlen", int), ("seed", int), ("blocksize", int), ("percdamp", float),
                      ("tokens-per-round", int), ("finetune-seqlen", int), ("micro-batch-size", int), ("grad-accum", int),
                      ("lr", float), ("warmup-steps", int), ("min-lr-ratio", float), ("weight-decay", float),
                      ("lm-weight", float), ("temperature", float), ("finetune-seed", int), ("checkpoint-every", int),
                      ("rounds-per-run", int), ("batch-size", int), ("eval-batch-size", int)):
        p.add_argument(f"--{name}", type=typ, default=defaults[name.replace("-", "_")])
    p.add_argument("--lr-schedule", choices=("cosine", "linear"), default=defaults["lr_schedule"])
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none", help="mixed precision on a GPU")
    p.add_argument("--eval", action="append", default=[], metavar="SPEC", help="evaluation SPEC (repeatable)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="defaults to --seqlen")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    _add_tasks(p)  # scored on the dense and the final model once the schedule is complete
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _progressive(args: argparse.Namespace) -> int:
    from stages.config import parse_nm
    from stages.progressive import ProgressiveConfig, summary_markdown

    schedule = args.schedule
    if args.nm:
        if schedule:
            raise ValueError("give either --schedule or --nm (an N:M ramp), not both")
        n, m = parse_nm(args.nm)
        schedule = ",".join(f"{i}:{m}" for i in range(1, n + 1))
    extra = {} if schedule is None else {"schedule": schedule}
    names = ("nsamples", "seqlen", "seed", "blocksize", "percdamp", "tokens_per_round", "finetune_seqlen",
             "micro_batch_size", "grad_accum", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "lm_weight",
             "temperature", "finetune_seed", "checkpoint_every", "rounds_per_run", "batch_size", "eval_batch_size",
             "lr_schedule", "autocast", "calib", "finetune_data", "eval_seqlen", "eval_windows", "device",
             "trust_remote_code")  # fmt: skip
    cfg = ProgressiveConfig(
        model=args.model, run_dir=args.run_dir, distill=tuple(d.strip() for d in args.distill.split(",") if d.strip()),
        eval=tuple(args.eval), tasks=_task_specs(args.tasks), task_limit=args.limit, progress=not args.no_progress,
        **{k: getattr(args, k) for k in names}, **extra,
    )
    from flows.progressive import progressive

    out = progressive(cfg)
    print()
    print(summary_markdown(out["summary"]))
    print(f"\n{out['message']}")
    print(f"summary: {Path(cfg.run_dir) / 'summary.json'}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-layer report, plots and HTML of one run, or several side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="where the comparison of several runs goes (default: the first "
                   "run's eval/); for one run, where its report goes (default: RUN_DIR/eval)")


def _prune(args: argparse.Namespace) -> int:
    from stages.config import PruneConfig

    cfg = PruneConfig(
        model=args.model, run_dir=args.run_dir, method=args.method, sparsity=args.sparsity, nm=args.nm,
        wbits=args.wbits, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        blocksize=args.blocksize, percdamp=args.percdamp, damp_retries=args.damp_retries, owl=args.owl,
        owl_lambda=args.owl_lambda, trust_remote_code=args.trust_remote_code, eval=tuple(args.eval),
        eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows, eval_batch_size=args.eval_batch_size,
        tasks=_task_specs(args.tasks), task_limit=args.limit, device=args.device, batch_size=args.batch_size, keep_acts=args.keep_acts, progress=not args.no_progress,
    )
    t_import = time.perf_counter()
    from flows.oneshot import metrics_markdown, oneshot

    startup = time.perf_counter() - T0
    t_flow = time.perf_counter()
    metrics = oneshot(cfg)
    total = time.perf_counter() - T0
    print()
    print(metrics_markdown(metrics, cfg))
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in metrics["timings"].items())
    evals = sum(m.get("seconds", 0) + m.get("dense_seconds", 0) for m in metrics.values() if isinstance(m, dict))
    evals += sum(m[w]["seconds"] for m in (metrics.get("tasks") or {}).values() for w in ("dense", "pruned"))
    print(f"\ntimings: start-up (imports) {startup:.1f}s, flow {time.perf_counter() - t_flow:.1f}s "
          f"[{stages}, evaluate {evals:.1f}s], total {total:.1f}s")
    print(f"pruned model: {Path(cfg.run_dir) / 'model'}   metrics: {Path(cfg.run_dir) / 'eval' / 'metrics.json'}   "
          f"report: {Path(cfg.run_dir) / 'eval' / 'report.html'}")
    del t_import
    return 0


def _eval(args: argparse.Namespace) -> int:
    tasks = list(_task_specs(args.tasks))
    from flows.evaluate import check_request, eval_markdown

    check_request(args.eval, tasks, args.limit)  # before Prefect starts
    from flows.evaluate import evaluate

    res = evaluate(args.model, args.eval, args.seqlen, args.eval_windows, args.device, args.batch_size,
                   args.trust_remote_code, tasks, args.limit)
    print(eval_markdown(res))
    return 0


def _report(args: argparse.Namespace) -> int:
    from stages.report import write_report

    for path in write_report(args.run_dirs, args.out):
        print(path)
    return 0


def _status(args: argparse.Namespace) -> int:
    from stages.status import run_status

    print(run_status(Path(args.run_dir)))
    return 0


def main(argv: list[str] | None = None) -> int:
    _prefect_env()
    parser = argparse.ArgumentParser(prog="sparsegpt", description="SparseGPT pruning of Hugging Face causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_progressive(sub)
    _add_report(sub)
    st = sub.add_parser("status", help="what is done and left in a run directory")
    st.add_argument("run_dir")
    args = parser.parse_args(argv)
    from stages.rundir import RunError

    try:
        return {"prune": _prune, "eval": _eval, "report": _report, "status": _status, "progressive": _progressive}[args.command](args)
    except (ValueError, RunError, FileNotFoundError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
