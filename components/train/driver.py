"""What every training stage's driver shares (contrastive pretraining, AltCLIP's two stages, ClipCap's two):
the stage's trainer settings, DeepSpeed's config, the workers' config, Ray Train + export, the loss plot."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import ray
import torch
from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components import storage
from components.tracking import mlflow_runs
from components.train.loop import LoopSettings
from components.train.trainer import (
    ScaleSettings,
    checkpoint_uri,
    export_checkpoint,
    fit,
    resolve_precision,
    resolve_use_gpu,
    trainer_state,
)


def stage_trainer(cfg: DictConfig, stage: str) -> DictConfig:
    """The trainer group with a stage's own settings (samples, batch, lr, ...) on top: cfg[stage].trainer."""
    return OmegaConf.merge(cfg.trainer, cfg[stage].trainer)


@dataclass
class TrainedRun:
    model: torch.nn.Module  # the export, loaded
    checkpoint: str  # the last Ray Train checkpoint, a path or URL (resume_from)
    step: int
    samples_seen: int
    seconds: float


def deepspeed_settings(cfg: DictConfig, trainer_cfg: DictConfig) -> dict[str, Any]:
    return resolve_precision(OmegaConf.to_container(cfg.deepspeed, resolve=True), resolve_use_gpu(trainer_cfg.use_gpu))


def resolve_compile(setting: bool | str, use_gpu: bool) -> bool:
    """trainer.compile: auto compiles on GPUs, where inductor's fused kernels pay for the compilation within a run's
    first minutes (1.4-1.6x a step on an H200, BENCHMARKS.md), and not on CPUs, where a tiny CLIP's compilation
    alone outlasts the demo's training (~50 s a rank here)."""
    if setting == "auto":
        return use_gpu
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"trainer.compile must be auto, true or false, got {setting!r}")


def describe_scale(trainer_cfg: DictConfig, deepspeed: dict[str, Any]) -> str:
    device = "GPU" if resolve_use_gpu(trainer_cfg.use_gpu) else "CPU"
    return (f"{trainer_cfg.workers} {device} workers, ZeRO-{deepspeed['zero_optimization']['stage']} "
            f"{'bf16' if deepspeed['bf16']['enabled'] else 'fp32'}, {trainer_cfg.samples} samples")


def worker_config(cfg: DictConfig, trainer_cfg: DictConfig, deepspeed: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The part of train_worker's config that comes from the trainer settings (the task adds its own)."""
    return {
        "loop": asdict(LoopSettings.from_trainer(trainer_cfg)),
        "deepspeed": deepspeed,
        "activation_checkpointing": bool(trainer_cfg.activation_checkpointing),
        "compile": resolve_compile(trainer_cfg.compile, resolve_use_gpu(trainer_cfg.use_gpu)),
        "torch_threads": trainer_cfg.torch_threads or max(1, (os.cpu_count() or 1) // trainer_cfg.workers),
        "mlflow": {"tracking_uri": mlflow_runs.tracking_uri(), "run_id": run_id},
    }


LATEST = "latest"  # trainer.resume_from=latest
RAY_CHECKPOINTS = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints


def latest_checkpoint(storage_path: str, run_name: str) -> str:
    """The newest checkpoint Ray Train registered for any run named `run_name`-<MLflow run id> under
    `storage_path` (a run whose driver died, or a finished one), as open_clip's `--resume latest` finds its last.
    Only registered checkpoints count: one half-written when the driver died is not in Ray's record.
    FileNotFoundError in one line when there is none."""
    root = storage.location(storage_path)
    own = re.compile(rf"{re.escape(run_name)}-[0-9a-f]{{8}}")
    found = []
    for run in (root.iterdir() if root.is_dir() else []):
        record = run / RAY_CHECKPOINTS
        if own.fullmatch(run.name) and record.is_file():
            latest = json.loads(record.read_text()).get("latest_checkpoint_result")
            if latest:
                found.append(run / latest["checkpoint_dir_name"])
    if not found:
        raise FileNotFoundError(f"trainer.resume_from=latest: no checkpoint of a {run_name!r} run under {root}")
    return str(max(found, key=lambda checkpoint: checkpoint.name))  # checkpoint_<time>: names sort by time


def resolve_resume(trainer_cfg: DictConfig, run_name: str, stage: str) -> None:
    """trainer.resume_from=latest replaced, in the config, by the checkpoint it finds (said in one line)."""
    if trainer_cfg.resume_from == LATEST:
        trainer_cfg.resume_from = latest_checkpoint(trainer_cfg.storage_path, run_name)
        print(f"[{stage}] resuming from {trainer_cfg.resume_from}", flush=True)


def train_and_export(trainer_cfg: DictConfig, train_config: dict[str, Any], dataset: ray.data.Dataset,
                     run_name: str, export_dir: UPath, tokenizer_dir: str | None, build=None) -> TrainedRun:
    """Ray Train + DeepSpeed on `dataset`, then the last checkpoint consolidated into `export_dir`
    (build: the task's spec -> module, when it is not a contrastive family)."""
    scale = ScaleSettings(workers=trainer_cfg.workers, use_gpu=trainer_cfg.use_gpu,
                          cpus_per_worker=trainer_cfg.cpus_per_worker, keep_checkpoints=trainer_cfg.keep_checkpoints,
                          max_failures=trainer_cfg.max_failures,
                          storage_path=str(storage.location(trainer_cfg.storage_path)),
                          run_name=run_name,
                          resume_from=str(storage.location(trainer_cfg.resume_from)) if trainer_cfg.resume_from else None)
    started = time.perf_counter()
    result = fit(train_config, dataset, scale)
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as checkpoint_dir:
        state = trainer_state(Path(checkpoint_dir))
        model = export_checkpoint(Path(checkpoint_dir), export_dir, tokenizer_dir, build)
    return TrainedRun(model, checkpoint_uri(result.checkpoint), state["step"], state["samples_seen"], seconds)


def log_loss_curve(run_id: str, ylabel: str = "contrastive loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run_id, "loss")
    if not history:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([m.step for m in history], [m.value for m in history])
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    mlflow.log_figure(figure, "plots/loss.png")
    plt.close(figure)
