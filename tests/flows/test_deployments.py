"""prefect.yaml: every deployment's entrypoint loads and its parameters validate into the flow's types.

Deployment parameters travel as JSON; Prefect rebuilds the flow's typed parameters
with pydantic, so a `PruneConfig` must survive the trip, and bad settings must fail
with the config's own message before any work starts.
"""

import json
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ParameterTypeError
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema

from stages.config import EvaluateConfig, PruneConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deployments() -> dict[str, dict]:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}]
    return {d["name"]: d for d in spec["deployments"]}


def load(entrypoint: str):
    return load_flow_from_entrypoint(str(REPO / entrypoint))


def test_oneshot_deployment_parameters_become_a_prune_config(deployments):
    dep = deployments["sparsegpt-oneshot"]
    assert dep["work_pool"]["name"] == "local-process"
    flow = load(dep["entrypoint"])
    assert flow.name == "sparsegpt-oneshot"
    cfg = flow.validate_parameters(dep["parameters"])["cfg"]
    assert isinstance(cfg, PruneConfig)
    assert (cfg.model, cfg.calib.spec, cfg.calib.nsamples, cfg.calib.seqlen, cfg.solver.sparsity) == (
        "smollm2-135m",
        "pydoc",
        32,
        512,
        0.5,
    )
    assert (cfg.run_dir, cfg.eval.specs, cfg.eval.windows, cfg.runtime.progress) == (
        "runs/deployed-oneshot",
        ("pydoc",),
        8,
        False,
    )
    schema = parameter_schema(flow).model_dump()
    assert schema["required"] == ["cfg"] and "sparsity" in schema["definitions"]["SolverConfig"]["properties"]
    assert set(schema["definitions"]["PruneConfig"]["properties"]) >= {"calib", "solver", "eval", "runtime"}


def test_evaluate_deployment_parameters_validate(deployments):
    dep = deployments["sparsegpt-evaluate"]
    flow = load(dep["entrypoint"])
    assert flow.name == "sparsegpt-evaluate"
    cfg = flow.validate_parameters(dep["parameters"])["cfg"]
    assert isinstance(cfg, EvaluateConfig) and cfg.eval.specs == ("pydoc",) and cfg.eval.windows == 8
    with_tasks = flow.validate_parameters({"cfg": {"model": "m", "eval": {"tasks": ["piqa"], "task_limit": "50"}}})[
        "cfg"
    ]
    assert (with_tasks.eval.specs, with_tasks.eval.tasks, with_tasks.eval.task_limit) == ((), ("piqa",), 50)


def test_prune_config_round_trips_through_json_parameters(tmp_path):
    from flows.oneshot import oneshot

    (tmp_path / "x.txt").write_text("some text")
    (tmp_path / "boolq.jsonl").write_text("{}")
    cfg = PruneConfig.of(
        model="m",
        run_dir="r",
        nm="2:4",
        eval=("pydoc", f"text={tmp_path / 'x.txt'}"),
        eval_windows=3,
        owl=True,
        tasks=(f"boolq={tmp_path / 'boolq.jsonl'}", "piqa"),
        task_limit=10,
    )
    as_json = {"cfg": json.loads(json.dumps(cfg.to_dict()))}  # what a deployment or flow run stores
    assert oneshot.validate_parameters(as_json)["cfg"] == cfg
    assert oneshot.validate_parameters({"cfg": {"model": "m"}})["cfg"] == PruneConfig(model="m")
    assert PruneConfig.from_dict(as_json["cfg"]) == cfg


def test_bad_config_parameters_fail_with_the_configs_message():
    from flows.oneshot import oneshot

    with pytest.raises(ParameterTypeError, match=r"sparsity must be a fraction"):
        oneshot.validate_parameters({"cfg": {"solver": {"sparsity": 1.5}}})
    with pytest.raises(ParameterTypeError, match=r"N:M must look like"):
        oneshot.validate_parameters({"cfg": {"solver": {"nm": "2-4"}}})
    with pytest.raises(ParameterTypeError, match=r"unknown task 'mmlu'"):
        oneshot.validate_parameters({"cfg": {"eval": {"tasks": ["mmlu"]}}})


def test_sweep_deployment_parameters_become_a_sweep_config(deployments):
    from stages.sweep.config import SweepConfig, points

    dep = deployments["sparsegpt-sweep"]
    flow = load(dep["entrypoint"])
    assert flow.name == "sparsegpt-sweep" and dep["work_pool"]["name"] == "local-process"
    cfg = flow.validate_parameters(dep["parameters"])["cfg"]
    assert isinstance(cfg, SweepConfig) and cfg.pool == "local-process"
    assert cfg.grid == ("method=sparsegpt,wanda", "sparsity=0.5,0.6")
    pts = points(cfg)
    assert [(p.cfg.solver.method, p.cfg.solver.sparsity) for p in pts] == [
        ("sparsegpt", 0.5),
        ("sparsegpt", 0.6),
        ("wanda", 0.5),
        ("wanda", 0.6),
    ]
    assert all(p.cfg.calib.nsamples == 32 and p.cfg.eval.windows == 8 for p in pts)
    with pytest.raises(ParameterTypeError, match=r"poll_seconds must be positive"):
        flow.validate_parameters({"cfg": {"grid": ["sparsity=0.5"], "poll_seconds": 0}})
