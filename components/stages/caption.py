"""Captioning with a registered captioner: shards or a folder of images in, Parquet or JSON Lines out
(pipelines/caption.py); in the chain, the ingested images captioned by the chain's ClipCap."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from components import storage
from components.runtime import check_typed_settings, init_ray
from components.stages.wiring import Wiring, folder_exists, quoted, stage_config
from components.tracking import mlflow_runs
from components.workflow import Outputs, Stage


def run(cfg: DictConfig) -> dict:
    from components.caption import inference
    from components.train.trainer import resolve_use_gpu

    check_typed_settings(cfg)
    if not cfg.data_path:
        raise ValueError("give data=<shard directory, Parquet file or folder of images>")
    if cfg.output_format not in inference.OUTPUT_FORMATS:
        raise ValueError(f"output_format {cfg.output_format!r}: use one of {inference.OUTPUT_FORMATS}")
    data = storage.location(cfg.data_path)
    output = storage.location(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir) / "captions"
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"output {output} already holds files: choose another output=")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    mlflow_runs.configure(cfg.mlflow.experiment)
    settings = {k: v for k, v in OmegaConf.to_container(cfg.generate, resolve=True).items() if v is not None}
    with mlflow_runs.start_run(cfg.mlflow.run_name, cfg.mlflow.experiment,
                               tags={"stage": "caption", "model_uri": str(cfg.model_uri), "data": str(data)}):
        mlflow_runs.log_params(OmegaConf.to_container(cfg, resolve=True))
        model = str(cfg.model_uri) if ":/" in str(cfg.model_uri) else str(storage.location(cfg.model_uri))
        rows = inference.read_images(data, cfg.caption_field)
        expected = rows.count()
        captioned = inference.caption_dataset(rows, model, mlflow_runs.tracking_uri(), settings,
                                              batch_size=cfg.inference.batch_size, actors=cfg.inference.actors,
                                              use_gpu=resolve_use_gpu(cfg.inference.use_gpu))
        inference.write_captions(captioned, output, cfg.output_format)
        counts = inference.outcome_counts(output, cfg.output_format)
        if counts["rows"] != expected:
            raise RuntimeError(f"{expected} images read but {counts['rows']} rows written to {output}")
        preview = inference.read_captions(output, cfg.output_format).take(cfg.preview)
        mlflow_runs.log_metrics({"images": counts["rows"], "captioned": counts["rows"] - counts["failed"],
                                 "failed": counts["failed"]})
        mlflow_runs.log_text("\n".join(f"{r['key']}\t{r['caption']}\t{r['error'] or ''}" for r in preview),
                             "captions/preview.tsv")

    print(f"accounting: input {counts['rows']} = captioned {counts['rows'] - counts['failed']} + "
          f"failed {counts['failed']} (see the error column)")
    for row in preview:
        print(f"  {row['key']}: {row['caption']!r}" + (f" (error: {row['error']})" if row["error"] else ""))
    print(f"captions: {output} ({cfg.output_format})")
    return {**counts, "output": str(output)}


def config(wiring: Wiring, up: dict[str, Outputs], out: str) -> DictConfig:
    return stage_config("caption", wiring.overrides("caption", f"model_uri={quoted(up['clipcap']['model_uri'])}",
                                                    f"data_path={quoted(up['ingest']['shards'])}",
                                                    f"output={quoted(out)}"))


def outputs(cfg: DictConfig) -> Outputs:
    counts = run(cfg)
    return {"captions": counts["output"], "rows": counts["rows"], "failed": counts["failed"]}


def stage(wiring: Wiring) -> Stage:
    return Stage("caption", ("ingest", "clipcap"), lambda up, out: config(wiring, up, out), outputs,
                 folder_exists("captions"))
