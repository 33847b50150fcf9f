"""The evaluation flow: perplexity of any checkpoint on dataset SPECs, block by block."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from stages.evaluate import blockwise_perplexity
from stages.models import load_tokenizer, resolve_model
from stages.perplexity import eval_windows
from stages.data import parse_spec


@task(name="perplexity", task_run_name="perplexity-{spec}")
def perplexity(model_dir: str, spec: str, seqlen: int, windows: int | None, device: str, batch_size: int,
               trust_remote_code: bool) -> dict:
    tok = load_tokenizer(model_dir, trust_remote_code)
    ids = eval_windows(tok, spec, seqlen, windows)
    t0 = time.perf_counter()
    res = blockwise_perplexity(model_dir, ids, device, batch_size=batch_size, progress=True,
                               desc=parse_spec(spec).label, trust_remote_code=trust_remote_code)
    out = {**res.to_dict(), "seconds": time.perf_counter() - t0}
    get_run_logger().info("%s: ppl %.4f over %d x %d tokens", spec, out["ppl"], out["windows"], out["seqlen"])
    return out


@flow(name="sparsegpt-evaluate")
def evaluate(model: str, specs: list[str], seqlen: int = 2048, windows: int | None = None, device: str = "cpu",
             batch_size: int = 4, trust_remote_code: bool = False) -> dict:
    """Perplexity of ``model`` (directory, hub id or ``smollm2-135m``) on every SPEC."""
    for spec in specs:
        parse_spec(spec)
    model_dir = str(resolve_model(model, trust_remote_code=trust_remote_code))
    res = {parse_spec(s).label: perplexity(model_dir, s, seqlen, windows, device, batch_size, trust_remote_code) for s in specs}
    rows = [f"| {label} | {m['windows']} x {m['seqlen']} | {m['ppl']:.2f} |" for label, m in res.items()]
    create_markdown_artifact(markdown="\n".join(["| dataset | windows x seqlen | ppl |", "|---|---|---|", *rows]),
                             key="sparsegpt-eval", description=f"perplexity of {model}")
    return res
