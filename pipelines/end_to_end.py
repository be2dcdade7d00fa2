"""The whole chain on one corpus: ingest -> pretrain -> evaluate -> AltCLIP -> ClipCap -> caption, plus the
DataComp-style bootstrap (clip_filter -> pretrain_filtered -> evaluate_filtered), under one MLflow parent run.

    python pipelines/end_to_end.py                                      # the default chain on the built-in corpus
    python pipelines/end_to_end.py                                      # again: every stage skipped
    python pipelines/end_to_end.py 'overrides.evaluate=[tasks=[retrieval]]'   # only evaluate re-runs
    python pipelines/end_to_end.py corpus=emoji_salted \\
        stages=[ingest,pretrain,evaluate,clip_filter,pretrain_filtered,evaluate_filtered]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/end_to_end.py

Each stage is a module of components/stages/: its driver, called with the config its command line
(pipelines/<name>.py) would give, plus the upstream outputs (shard directories, `models:/name/version`); its MLflow
run nests under this run. The cache key of a stage is the hash of its resolved config and its upstream outputs
(components/workflow.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from components import lease
from components.data.ingest import IngestError
from components.runtime import check_typed_settings, init_ray, one_line_errors
from components.stages import altclip, caption, clip_filter, clipcap, evaluate, ingest, pretrain
from components.stages.wiring import Wiring
from components.storage import location
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage, StateFile, WorkflowError, run_stages


def build_stages(cfg: DictConfig) -> list[Stage]:
    """The chain, in order: each stage as its module in components/stages/ wires it."""
    wiring = Wiring(cfg)
    return [ingest.stage(wiring), pretrain.stage(wiring), evaluate.stage(wiring), clip_filter.stage(wiring),
            pretrain.filtered_stage(wiring), evaluate.filtered_stage(wiring), altclip.stage(wiring),
            clipcap.stage(wiring), caption.stage(wiring)]


@hydra.main(config_path="../conf", config_name="end_to_end", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("end-to-end", WorkflowError, IngestError, lease.LeaseError, ValueError, FileNotFoundError):
        end_to_end(cfg)


def end_to_end(cfg: DictConfig) -> list:
    import mlflow

    check_typed_settings(cfg)
    init_ray(cfg.ray.address, cfg.ray.num_cpus or 2 * (os.cpu_count() or 1))
    work_dir = location(cfg.work_dir)
    state = StateFile(work_dir / "state.json")
    stages = build_stages(cfg)
    selected = list(cfg.stages)

    def on_skip(stage: Stage, record: dict[str, Any]) -> None:
        with mlflow_runs.start_run(f"{stage.name} (unchanged)", cfg.mlflow.experiment,
                                   tags={"stage": stage.name, "workflow.action": "skipped"}):
            mlflow_runs.log_json(record, "workflow/record.json")

    with lease.held(work_dir, "workflow"), mlflow_runs.start_run(
            cfg.mlflow.run_name, cfg.mlflow.experiment,
            tags={"stage": "end-to-end", "workflow.stages": ",".join(selected)}) as parent:
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        try:
            reports = run_stages(stages, selected, state, work_dir, force=list(cfg.force), on_skip=on_skip)
        finally:
            mlflow_runs.log_json(state.records, "workflow/state.json")
        for report in reports:
            mlflow.set_tag(f"workflow.{report.name}", report.action)
            mlflow_runs.log_metrics({f"{report.name}.seconds": report.seconds,
                                     **{f"{report.name}.{k}": v for k, v in _numbers(report.outputs).items()}})
    print(summary(reports, state))
    print(f"MLflow parent run {parent.info.run_id} at {mlflow_runs.tracking_uri()}  (see it: make mlflow-ui)")
    return reports


def _numbers(outputs: Outputs, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a stage's outputs (metrics, counts), flattened."""
    numbers = {}
    for key, value in outputs.items():
        if isinstance(value, dict):
            numbers.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = float(value)
    return numbers


def summary(reports: list, state: StateFile) -> str:
    lines = ["stage               action    seconds  outputs"]
    for report in reports:
        shown = {k: v for k, v in report.outputs.items() if isinstance(v, str)}
        lines.append(f"{report.name:<19} {report.action:<9} {report.seconds:>7.0f}  {json.dumps(shown)}")
    lines.append(f"state: {state.path}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
