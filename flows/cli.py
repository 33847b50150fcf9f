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
import ctypes
import ctypes.util
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.options import add_options, build, command_config
from stages.config.parts import EXPORT_FORMATS, GGUF_TYPES

T0 = time.perf_counter()


def _prefect_env() -> None:
    """Defaults that keep Prefect's start-up small and quiet; a configured server is reused."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _EarlyServer:
    """Prefect's temporary API server, started as a process (`flows/server.py`) before this one imports torch.

    Prefect starts that server at the first flow call and waits for it there (about 6 s here), after
    importing its server package in this process to do so. Started at once instead, it boots on another
    core while this process imports torch and checks its input. `configure` points this process's
    Prefect at it (`PREFECT_API_URL`, before Prefect is imported: it reads its settings once), so the
    flows use it as a configured server; `ready` waits until it answers. Nothing is served when a server
    is configured or temporary servers are off: the script says so and exits, and Prefect runs as it
    would. The server stops at this process's exit, and with it if it is killed.
    """

    SCRIPT = Path(__file__).with_name("server.py")

    def __init__(self, start: bool = True) -> None:
        self._proc: subprocess.Popen | None = None
        self._address: str | None = None
        if start:
            self._proc = subprocess.Popen(
                [sys.executable, str(self.SCRIPT)],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,  # Ctrl-C reaches this process only, which still reports to the server
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
            atexit.register(self.stop)  # registered first, so it runs after Prefect's exit handlers (log flushes)

    def configure(self) -> None:
        """Point this process's Prefect at the server (call before Prefect is imported); without one (a
        configured server, temporary servers off, or a script that could not start), Prefect decides."""
        if self._proc is None or self._address is not None:
            return
        line = self._proc.stdout.readline().split()  # "port N" or "configured"; nothing if it failed
        self._proc.stdout.close()
        if line[:1] != ["port"] or "prefect" in sys.modules:  # too late to point it elsewhere: Prefect's own start
            self.stop()
            return
        self._address = f"http://127.0.0.1:{int(line[1])}"
        os.environ["PREFECT_API_URL"] = f"{self._address}/api"  # child processes (ranks) use it too
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI (nor does Prefect's own): no "View at" links

    def ready(self) -> None:
        """Wait until the server answers; raise if it exits or does not answer in time."""
        self.configure()
        if self._address is None:
            return
        import urllib.error
        import urllib.request

        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self._address}/api/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {code} before it answered (see above)")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Prefect's temporary server did not answer within {timeout:.0f} s "
                    "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); or set PREFECT_API_URL to a running server"
                )
            time.sleep(0.05)
        logging.getLogger("prefect").info(
            "Starting temporary server on %s\nSee https://www.prefect.io/docs/v3/concepts/server#how-to-guides "
            "for more information on running a dedicated Prefect server.",
            self._address,
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); a no-op once stopped."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if self._address is not None:
            logging.getLogger("prefect").info("Stopping temporary server on %s", self._address)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent(parent: int) -> None:
    """In the server's process, before it runs: Linux sends it SIGTERM when the CLI's process ends."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the CLI's exit handler still stops it
        return
    if os.getppid() != parent:  # the CLI ended before the signal was set
        os.kill(os.getpid(), signal.SIGTERM)


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
    that passes its own ``argv`` (tests, scripts) leaves that start to Prefect's first flow."""
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
