"""The `sparsegpt` command line: prune, eval, progressive, report, status.

    sparsegpt prune MODEL --run-dir runs/x --sparsity 0.5 [--nm 2:4] [--method wanda] [--tasks SPEC,...] ...
    sparsegpt eval MODEL [--eval SPEC ...] [--tasks SPEC,SPEC,...] [--limit N] [--seqlen 2048 --eval-windows N]
    sparsegpt progressive MODEL --run-dir runs/p --schedule 0.5,0.6,0.7,0.8 [--tokens-per-round N] ...
    sparsegpt report runs/x [runs/y ...] [--out DIR]
    sparsegpt status runs/x
    sparsegpt export runs/x [--format hf|compressed-tensors|gguf] [--gguf-type f16|q8_0|q4_0] [--out DIR]
    sparsegpt sweep MODEL --run-root runs/s --grid method=sparsegpt,wanda --grid sparsity=0.5,0.6 [--pool NAME] ...

Bad input ends with one line `error: ...` naming the problem and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import time
from pathlib import Path

from flows.options import add_options, build, command_config
from flows.server import EarlyServer as _EarlyServer
from stages.config.parts import EXPORT_FORMATS, GGUF_TYPES
from stages.run.exit import exit_now

T0 = time.perf_counter()


def _prefect_env() -> None:
    """Defaults that keep Prefect's start-up small and quiet; a configured server is reused."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt (not an Exception: nothing
    that handles errors swallows it)."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def _terminate_like_interrupt() -> None:
    """`kill PID` ends a run as Ctrl-C does: the stack unwinds (locks released; records are atomic, so
    nothing half-written remains) and exit handlers run, which stop Prefect's temporary server.

    Without it, a SIGTERM inside a flow reaches Prefect's engine, which marks the run crashed and
    re-sends the signal to the default handler: the process dies at once and the server it started
    outlives it.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)


class _QuickExit:
    """End a program's process as soon as its exit handlers have run, without the interpreter's teardown
    (`stages.run.exit.exit_now`: results are written, closed and renamed into place before the flow returns).

    Registered first, so it runs last: after Prefect's handlers and the temporary server's stop, and after
    the non-daemon threads were joined; it shuts logging down (registered before it) and flushes the
    standard streams itself. Not under coverage, whose data is saved by an exit handler registered before.
    """

    def __init__(self) -> None:
        self.code: int = 1  # an uncaught exception's exit status, until `finish` says otherwise
        atexit.register(self._exit)

    def finish(self, code: object) -> None:
        """Exit with ``code`` as `sys.exit` would: None is 0, an int itself, anything else (a message) 1."""
        self.code = 0 if code is None else code if isinstance(code, int) else 1

    def _exit(self) -> None:
        exit_now(self.code)


def _add_prune(sub: argparse._SubParsersAction) -> None:
    from stages.config import PruneConfig

    p = sub.add_parser("prune", help="prune a model one-shot into a run directory (resumable)")
    add_options(p, PruneConfig())


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on dataset SPECs and zero-shot task scores of a model")
    add_options(p, command_config("eval"), aliases={"eval_seqlen": ("--seqlen",), "eval_batch_size": ("--batch-size",)})


def _add_progressive(sub: argparse._SubParsersAction) -> None:
    from stages.progressive.config import ProgressiveConfig

    p = sub.add_parser("progressive", help="prune-and-finetune rounds toward high sparsity (resumable, schedulable)")
    add_options(p, ProgressiveConfig())
    p.add_argument("--nm", dest="ramp", default=None, help="N:M ramp: --nm 2:4 means --schedule 1:4,2:4")


def _progressive(args: argparse.Namespace, server: _EarlyServer) -> int:
    from stages.config import parse_nm
    from stages.progressive.config import ProgressiveConfig

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "sparsegpt progressive does not run under torchrun (each process would run every round); "
            "start it as one process and give --nproc N for N local ranks"
        )
    if args.ramp:
        if "schedule" in vars(args):
            raise ValueError("give either --schedule or --nm (an N:M ramp), not both")
        n, m = parse_nm(args.ramp)
        args.schedule = ",".join(f"{i}:{m}" for i in range(1, n + 1))
    del args.ramp
    cfg = build(ProgressiveConfig(), args)
    from stages.progressive.check import check

    check(cfg)  # bad input is refused here, before any flow runs
    server.configure()
    from flows.progressive import progressive
    from stages.progressive.rounds import summary_markdown

    _task_lines_off_console(cfg.runtime.progress)
    server.ready()
    out = progressive(cfg)
    print()
    print(summary_markdown(out["summary"]))
    print(f"\n{out['message']}")
    print(f"summary: {Path(cfg.run_dir) / 'summary.json'}")
    return 0


class _TaskInfoOffConsole(logging.Filter):
    """Drops Prefect task-run records below WARNING (their state lines, per-block messages)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("prefect.task_runs") and record.levelno < logging.WARNING)


def _task_lines_off_console(progress: bool) -> None:
    """With progress bars on, the console holds one bar per stage and the final table: task-run lines below
    WARNING go only to Prefect's API (the UI, `prefect flow-run logs`), whose handler sits on the task-run
    logger itself, not between the bars' redraws. Warnings and the project's own log lines still print."""
    if not progress:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _TaskInfoOffConsole) for f in handler.filters
        ):
            handler.addFilter(_TaskInfoOffConsole())


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from stages.sweep.config import SweepConfig

    p = sub.add_parser("sweep", help="one-shot runs over a grid (here, or fanned out over a Prefect work pool)")
    add_options(p, SweepConfig())


def _sweep(args: argparse.Namespace, server: _EarlyServer) -> int:
    from stages.sweep.config import SweepConfig

    cfg = build(SweepConfig(), args)
    from stages.sweep.check import check

    check(cfg)  # a bad grid or point is refused here, before any flow runs
    server.configure()
    from flows.sweep import sweep

    _task_lines_off_console(cfg.runtime.progress)
    server.ready()
    out = sweep(cfg)
    print()
    print(Path(out["report"]).read_text(encoding="utf-8"))
    print(f"report: {out['report']}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-layer report, plots and HTML of one run, or several side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "--out",
        default=None,
        help="where the comparison of several runs goes (default: the first "
        "run's eval/); for one run, where its report goes (default: RUN_DIR/eval)",
    )


def _prune(args: argparse.Namespace, server: _EarlyServer) -> int:
    from stages.config import PruneConfig

    cfg = build(PruneConfig(), args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        from stages.prune.parallel import follow

        follow(cfg)  # a torchrun rank other than 0: prune with rank 0, which runs the flow
        return 0
    from stages.prune.check import check

    check(cfg)  # bad input is refused here, before any flow runs
    server.configure()
    from flows.artifacts import metrics_markdown
    from flows.oneshot import oneshot

    _task_lines_off_console(cfg.runtime.progress)
    server.ready()
    startup = time.perf_counter() - T0
    t_flow = time.perf_counter()
    metrics = oneshot(cfg)
    total = time.perf_counter() - T0
    print()
    print(metrics_markdown(metrics, cfg))
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in metrics["timings"].items())
    evals = sum(m.get("seconds", 0) + m.get("dense_seconds", 0) for m in metrics.values() if isinstance(m, dict))
    evals += sum(m[w]["seconds"] for m in (metrics.get("tasks") or {}).values() for w in ("dense", "pruned"))
    print(
        f"\ntimings: start-up (imports, checks, Prefect server) {startup:.1f}s, "
        f"flow {time.perf_counter() - t_flow:.1f}s [{stages}, evaluate {evals:.1f}s], total {total:.1f}s"
    )
    print(
        f"pruned model: {Path(cfg.run_dir) / 'model'}   metrics: {Path(cfg.run_dir) / 'eval' / 'metrics.json'}   "
        f"report: {Path(cfg.run_dir) / 'eval' / 'report.html'}"
    )
    return 0


def _eval(args: argparse.Namespace, server: _EarlyServer) -> int:
    cfg = build(command_config("eval"), args).check()  # the argument-only checks first: no torch imported yet
    from stages.evaluate.check import check

    check(cfg)  # bad input is refused here, before any flow runs
    server.configure()
    from flows.artifacts import eval_markdown
    from flows.evaluate import evaluate

    _task_lines_off_console(cfg.runtime.progress)
    server.ready()
    print(eval_markdown(evaluate(cfg)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from stages.report.report import write_report

    for path in write_report(args.run_dirs, args.out):
        print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from stages.export.export import export_run

    print(export_run(Path(args.run_dir), args.format, args.out, args.gguf_type))
    return 0


def _status(args: argparse.Namespace) -> int:
    from stages.report.status import run_status

    print(run_status(Path(args.run_dir)))
    return 0


def main(argv: list[str] | None = None, early_server: bool | None = None) -> int:
    """The command line; ``argv`` default: sys.argv. ``early_server`` (default: when ``argv`` is None, i.e.
    as a program) starts Prefect's temporary server while the input is checked (`_EarlyServer`); a caller
    that passes its own ``argv`` (tests, scripts) leaves that start to Prefect's first flow. As a program
    the process ends without the interpreter's teardown (`_QuickExit`)."""
    if argv is not None:
        return _main(argv, early_server)
    quick = _QuickExit()
    try:
        code = _main(None, early_server)
    except SystemExit as exc:  # argparse's usage errors and --help
        quick.finish(exc.code)
        raise
    quick.finish(code)
    return code


def _main(argv: list[str] | None, early_server: bool | None) -> int:
    _prefect_env()
    parser = argparse.ArgumentParser(prog="sparsegpt", description="SparseGPT pruning of Hugging Face causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_progressive(sub)
    _add_report(sub)
    _add_sweep(sub)
    st = sub.add_parser("status", help="what is done and left in a run directory")
    st.add_argument("run_dir")
    ex = sub.add_parser("export", help="a finished prune run as a checkpoint to serve, with a model card")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument(
        "--format",
        default="hf",
        choices=EXPORT_FORMATS,
        help="hf: safetensors (default); compressed-tensors: a --wbits run packed (vLLM); gguf: llama.cpp",
    )
    ex.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES, help="GGUF matrix type")
    ex.add_argument("--out", default=None, help="the export folder (default: RUN_DIR/export-FORMAT)")
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="tracebacks for user errors too (SPARSEGPT_DEBUG=1)")
    from flows.errors import DEBUG_ENV, USER_ERRORS, debug, one_line

    args = parser.parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    command = args.command
    del args.command, args.debug
    _terminate_like_interrupt()
    try:
        flows = {"prune": _prune, "eval": _eval, "progressive": _progressive, "sweep": _sweep}
        if command in flows:
            follower = int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
            start = (argv is None if early_server is None else early_server) and not follower  # rank 0 runs flows
            return flows[command](args, _EarlyServer(start))
        return {"report": _report, "status": _status, "export": _export}[command](args)
    except USER_ERRORS as exc:
        if debug():
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
