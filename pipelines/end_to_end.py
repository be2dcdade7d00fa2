"""The whole chain on one corpus: ingest -> pretrain -> evaluate -> AltCLIP -> ClipCap -> caption, plus the
DataComp-style bootstrap (clip_filter -> pretrain_filtered -> evaluate_filtered), under one MLflow parent run.

    python pipelines/end_to_end.py                                      # the default chain on the built-in corpus
    python pipelines/end_to_end.py                                      # again: every stage skipped
    python pipelines/end_to_end.py 'overrides.evaluate=[tasks=[retrieval]]'   # only evaluate re-runs
    python pipelines/end_to_end.py corpus=emoji_salted \\
        stages=[ingest,pretrain,evaluate,clip_filter,pretrain_filtered,evaluate_filtered]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/end_to_end.py

Each stage is its pipeline's own function (pipelines/<name>.py) called with the config its command line would
give, plus the upstream outputs (shard directories, `models:/name/version`); its MLflow run nests under this
run. The cache key of a stage is the hash of its resolved config and its upstream outputs (components/workflow).
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components import lease
from components.data.ingest import IngestError
from components.data.shard_sets import shard_set_digest
from components.data.sources import url_list_location
from components.data.url_list import list_identity
from components.runtime import init_ray, one_line_errors
from components.storage import location
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage, StateFile, WorkflowError, run_stages

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@cache
def pipeline(name: str):
    """pipelines/<name>.py as a module (the pipelines are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"clipforge_pipeline_{name}", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quoted(value: Any) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def stage_config(config_name: str, overrides: list[str]) -> DictConfig:
    """The config `python pipelines/<config_name>.py <overrides>` would run with (same conf/ search path)."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside this script's @hydra.main
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(str(CONF), version_base="1.3", job_name=config_name):
        return compose(config_name, overrides=overrides)


def registered_uri(outcome: dict[str, Any]) -> str:
    if not outcome.get("registered_version"):
        raise WorkflowError(f"the stage registered no model version ({outcome.get('registered_model')})")
    return f"models:/{outcome['registered_model']}/{outcome['registered_version']}"


def model_exists(outputs: Outputs) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, version = outputs["model_uri"].removeprefix("models:/").rsplit("/", 1)
    try:
        MlflowClient().get_model_version(name, version)
        return True
    except MlflowException:
        return False


def shards_exist(outputs: Outputs) -> bool:
    try:
        return shard_set_digest(outputs["shards"]) == outputs["manifest_digest"]
    except FileNotFoundError:
        return False


def shard_outputs(shard_dir: UPath, **extra: Any) -> Outputs:
    return {"shards": str(shard_dir), "manifest_digest": shard_set_digest(shard_dir), **extra}


def build_stages(cfg: DictConfig) -> list[Stage]:
    corpus = [f"data={cfg.corpus}", *cfg.data_overrides]
    common = [f"ray.address={quoted(cfg.ray.address)}" if cfg.ray.address else None, f"++progress={cfg.progress}"]
    common = [c for c in common if c]

    def overrides(stage: str, *wired: str) -> list[str]:
        return [*common, *wired, *cfg.overrides.get(stage, [])]

    def shards_of(up: dict[str, Outputs], stage: str = "ingest") -> str:
        return f"data.output_dir={quoted(up[stage]['shards'])}"

    def ingest(up, out):
        # Into the stage's keyed folder unless the data names its own: a changed ingest setting then never meets
        # an earlier run's shards (which ingest would refuse to mix with). Shards made elsewhere stay where they are.
        given = stage_config("ingest", overrides("ingest", *corpus))
        named = any(o.lstrip("+").startswith("data.output_dir=") for o in (*corpus, *cfg.overrides.get("ingest", [])))
        if named or given.data.source == "shards":
            return given
        return stage_config("ingest", overrides("ingest", *corpus, f"data.output_dir={quoted(out)}"))

    def url_list_digest(c):
        if c.data.source not in ("url_list", "image_folder") or not c.data.get("url_list"):
            return ""
        return json.dumps(list_identity(url_list_location(c)), sort_keys=True)  # path, size, mtime per file

    def run_ingest(c):
        if c.data.source != "shards":  # shards made elsewhere (data=webdataset) are handed on as they are
            pipeline("ingest").ingest(c)
        return shard_outputs(location(c.data.output_dir))

    def pretrain(up, out, stage="pretrain", shards="ingest", suffix=""):
        extra = [f"registry.model_name=clipforge-${{model.family}}{suffix}", f"mlflow.run_name=pretrain{suffix}"]
        return stage_config("pretrain_clip", overrides(stage, *corpus, shards_of(up, shards),
                                                       f"export_dir={quoted(out)}", *extra))

    def run_pretrain(c):
        outcome = pipeline("pretrain_clip").pretrain(c)
        return {"model_uri": registered_uri(outcome), "heldout": outcome.get("heldout")}

    def on_model(config_name: str, stage: str, up: dict[str, Outputs], setting: str, *extra: str,
                 model: str = "pretrain") -> DictConfig:
        """A stage reading the corpus' shards and a registered model (given as `setting`)."""
        return stage_config(config_name, overrides(stage, *corpus, shards_of(up),
                                                   f"{setting}={quoted(up[model]['model_uri'])}", *extra))

    def evaluate(up, out, stage="evaluate", model="pretrain"):
        return on_model("evaluate", stage, up, "model_uri", f"output_dir={quoted(out)}", f"mlflow.run_name={stage}",
                        model=model)

    def run_evaluate(c):
        from components.eval.runner import headline_metrics

        results = pipeline("evaluate").evaluate(c)
        return {"results_dir": str(location(c.output_dir) / "results"), "metrics": headline_metrics(results)}

    def clip_filter(up, out):
        return on_model("clip_filter", "clip_filter", up, "model_uri", f"output={quoted(out)}")

    def run_clip_filter(c):
        manifest = pipeline("clip_filter").clip_filter(c)
        return shard_outputs(location(manifest["output_dir"]), kept=manifest["kept"], input_rows=manifest["input_rows"],
                             against_truth=manifest.get("against_truth"))

    def altclip(up, out):
        return on_model("distill_altclip", "altclip", up, "teacher", f"export_dir={quoted(out)}",
                        f"work_dir={quoted(out + '-work')}")

    def run_altclip(c):
        outcome = pipeline("distill_altclip").distill(c)
        return {"model_uri": registered_uri(outcome["stage2"])}

    def clipcap(up, out):
        return on_model("train_clipcap", "clipcap", up, "clip", f"export_dir={quoted(out)}")

    def run_clipcap(c):
        outcome = pipeline("train_clipcap").train(c)
        return {"model_uri": registered_uri(outcome), "heldout": outcome.get("heldout")}

    def caption(up, out):
        return stage_config("caption", overrides("caption", f"model_uri={quoted(up['clipcap']['model_uri'])}",
                                                 f"data_path={quoted(up['ingest']['shards'])}", f"output={quoted(out)}"))

    def run_caption(c):
        counts = pipeline("caption").caption(c)
        return {"captions": counts["output"], "rows": counts["rows"], "failed": counts["failed"]}

    def captions_exist(outputs):
        return UPath(outputs["captions"]).is_dir()

    def pretrain_filtered(up, out):
        return pretrain(up, out, "pretrain_filtered", "clip_filter", "-filtered")

    def evaluate_filtered(up, out):
        return evaluate(up, out, "evaluate_filtered", "pretrain_filtered")

    def results_exist(outputs):
        return UPath(outputs["results_dir"]).is_dir()

    return [
        Stage("ingest", (), ingest, run_ingest, shards_exist, inputs_digest=url_list_digest),
        Stage("pretrain", ("ingest",), pretrain, run_pretrain, model_exists),
        Stage("evaluate", ("ingest", "pretrain"), evaluate, run_evaluate, results_exist),
        Stage("clip_filter", ("ingest", "pretrain"), clip_filter, run_clip_filter, shards_exist),
        Stage("pretrain_filtered", ("clip_filter",), pretrain_filtered, run_pretrain, model_exists),
        Stage("evaluate_filtered", ("ingest", "pretrain_filtered"), evaluate_filtered, run_evaluate, results_exist),
        Stage("altclip", ("ingest", "pretrain"), altclip, run_altclip, model_exists),
        Stage("clipcap", ("ingest", "pretrain"), clipcap, run_clipcap, model_exists),
        Stage("caption", ("ingest", "clipcap"), caption, run_caption, captions_exist),
    ]


@hydra.main(config_path="../conf", config_name="end_to_end", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("end-to-end", WorkflowError, IngestError, lease.LeaseError, ValueError, FileNotFoundError):
        end_to_end(cfg)


def end_to_end(cfg: DictConfig) -> list:
    import mlflow

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
