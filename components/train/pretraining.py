"""Contrastive pretraining, driver side: config -> tokenizer, model spec, Ray Data input -> Ray Train + DeepSpeed
-> export -> held-out retrieval -> MLflow model registry. pipelines/pretrain_clip.py calls `run`.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import mlflow
import ray
from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components import storage
from components.data.shard_sets import sample_count
from components.models.base import SIGLIP_LOGIT_BIAS_INIT
from components.models.factory import build_model, check_temperature_init, family_class
from components.models.text import TextProcessor
from components.tracking import mlflow_runs
from components.train.data import AugmentConfig, BatchSpec, TextConfig, matching_share, read_pairs, training_dataset
from components.train.driver import (
    deepspeed_settings,
    describe_scale,
    log_loss_curve,
    resolve_compile,
    resolve_resume,
    train_and_export,
    worker_config,
)
from components.train.loop import CHECKPOINT_TOKENIZER
from components.train.losses import ContrastiveLoss


def run_tokenizer(cfg: DictConfig, shard_dir: UPath, out_dir: UPath):
    """The tokenizer of the checkpoint resumed from (the vocabulary its embeddings were trained with), else
    cfg.tokenizer.path, else the pretrained checkpoint's own (model.pretrained), else a byte-level BPE trained on
    the training captions."""
    from components.models.tokenizer import captions_from_shards, has_tokenizer, prepare_tokenizer

    resumed = storage.location(cfg.trainer.resume_from) / CHECKPOINT_TOKENIZER if cfg.trainer.resume_from else None
    pretrained = cfg.model.get("pretrained")
    if resumed is not None and resumed.is_dir():
        given = resumed
    elif cfg.tokenizer.path:
        given = cfg.tokenizer.path
    elif pretrained and has_tokenizer(pretrained):
        given = pretrained
    else:
        given = None
    return prepare_tokenizer(given, lambda: captions_from_shards(shard_dir, limit=cfg.tokenizer.max_captions,
                                                                 where=_where(cfg.data.get("train_where"))),
                             out_dir, cfg.tokenizer.vocab_size)


def model_spec(cfg: DictConfig, tokenizer) -> dict[str, Any]:
    """The keyword arguments of build_model for this run: the YAML group plus what the tokenizer fixes."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    cls = family_class(model_cfg["family"])
    spec = {k: v for k, v in model_cfg.items() if k not in ("overrides", *cls.data_knobs)}
    spec.update(model_cfg.get("overrides") or {})
    if cfg.loss.kind == "siglip":
        spec["logit_bias"] = SIGLIP_LOGIT_BIAS_INIT
    if tokenizer is not None:
        spec.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return spec


def check_settings(cfg: DictConfig) -> None:
    """Refuse a bad loss or temperature setting in one line before anything starts (not minutes later in the
    workers)."""
    ContrastiveLoss(**OmegaConf.to_container(cfg.loss, resolve=True))
    check_temperature_init(cfg.model.get("temperature_init"), cfg.model.get("pretrained"))
    resolve_compile(cfg.trainer.compile, use_gpu=False)


def run(cfg: DictConfig, shard_dir: UPath, run_id: str) -> dict[str, Any]:
    trainer_cfg = cfg.trainer
    resolve_resume(trainer_cfg, cfg.mlflow.run_name, "pretrain")
    run_name = f"{cfg.mlflow.run_name}-{run_id[:8]}"
    tokens = family_class(cfg.model.family).uses_tokenizer
    tokenizer_dir = storage.location(cfg.tokenizer.save_dir) / run_name  # read by the data workers (any node)
    tokenizer = run_tokenizer(cfg, shard_dir, tokenizer_dir) if tokens else None
    spec = model_spec(cfg, tokenizer)
    model = build_model(**spec)  # on the driver too: sizes for the data pipeline, and an early config error
    mlflow_runs.log_metrics({"model.parameters": model.num_parameters()})
    deepspeed = deepspeed_settings(cfg, trainer_cfg)
    print(f"[pretrain] {cfg.model.family} ({cfg.model.preset}): {model.num_parameters() / 1e6:.1f}M parameters, "
          f"{describe_scale(trainer_cfg, deepspeed)}", flush=True)

    text = model.text_processor(str(tokenizer_dir) if tokens else None)
    dataset = image_text_dataset(cfg, trainer_cfg, shard_dir, model, text_config(cfg, text))
    train_config = {
        **worker_config(cfg, trainer_cfg, deepspeed, run_id),
        "task": "contrastive",
        "model": spec,
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "tokenizer_dir": str(tokenizer_dir) if tokens else None,
        "periodic_eval": periodic_eval_config(cfg, shard_dir),
    }
    export_dir = storage.location(cfg.export_dir)
    trained = train_and_export(trainer_cfg, train_config, dataset, run_name, export_dir,
                               str(tokenizer_dir) if tokens else None)
    print(f"[pretrain] exported to {export_dir}", flush=True)

    metrics = evaluate_heldout(cfg, shard_dir, trained.model, text)
    mlflow_runs.log_metrics({**{f"heldout.{k}": v for k, v in metrics.items()}, "train_seconds": trained.seconds})
    log_loss_curve(run_id)
    mlflow.set_tag("checkpoint", trained.checkpoint)
    from components.tracking.pyfunc import log_embedding_model

    with storage.local_copy(export_dir) as local_export:
        info = log_embedding_model(local_export, cfg.registry.model_name)
    version = getattr(info, "registered_model_version", None)
    return {"family": cfg.model.family, "export_dir": str(export_dir), "checkpoint": trained.checkpoint,
            "step": trained.step, "samples_seen": trained.samples_seen, "train_seconds": trained.seconds,
            "heldout": metrics, "model_uri": info.model_uri, "registered_model": cfg.registry.model_name,
            "registered_version": version}


def text_config(cfg: DictConfig, text: TextProcessor) -> TextConfig:
    """How the data workers turn captions into the model's text input (its processor), with
    `model.text_pair_fraction` of the images replaced by a rendered translation (data.caption_columns; CLIPPO)."""
    return TextConfig(text, text_pair_fraction=float(cfg.model.get("text_pair_fraction") or 0.0),
                      pair_columns=tuple(cfg.data.get("caption_columns") or ()))


def image_text_dataset(cfg: DictConfig, trainer_cfg: DictConfig, shard_dir: Path, model,
                       text: TextConfig) -> ray.data.Dataset:
    """The training rows of the shards (data.train_where), augmented and tokenised/rendered, in enough passes for
    the whole run."""
    augment = None if trainer_cfg.augment is None else AugmentConfig(scale=tuple(trainer_cfg.augment.scale),
                                                                     hflip=trainer_cfg.augment.hflip)
    # A resumed run draws its own shard order: the original run's would feed its first shards again.
    seed = trainer_cfg.seed + (zlib.crc32(str(trainer_cfg.resume_from).encode()) if trainer_cfg.resume_from else 0)
    spec_batch = BatchSpec(image_size=model.image_size, text=text, augment=augment, seed=seed)
    # Enough passes for the whole run in one stream; +1 for what each pass loses to drop_last and for the error
    # of the sampled share. A run that still outlasts the stream starts a new one (seconds of stall).
    where = _where(cfg.data.get("train_where"))
    kept = sample_count(shard_dir)[0] * matching_share(shard_dir, where)
    passes = math.ceil(trainer_cfg.samples / max(1, kept)) + 1
    return training_dataset(shard_dir, spec_batch, where=where, preprocess_workers=trainer_cfg.preprocess_workers,
                            passes=passes)


def periodic_eval_config(cfg: DictConfig, shard_dir: UPath) -> dict[str, Any] | None:
    """What the training loop needs to run an evaluator every N steps: held-out rows (plain data, images
    included) and the task's settings; None when periodic_eval.every is 0."""
    spec = cfg.get("periodic_eval")
    if not spec or not spec.every:
        return None
    from components.eval.periodic import heldout_rows

    samples = read_pairs(shard_dir, _where(cfg.data.get("eval_where"))).limit(spec.rows).take_all()
    fields = OmegaConf.to_container(cfg.fields, resolve=True)
    rows = heldout_rows(samples, fields["caption"], fields.get("labels") or {}, fields.get("languages") or {})
    settings = OmegaConf.to_container(spec.settings, resolve=True)
    if "templates" in settings:
        from components.eval.templates import resolve

        settings["templates"] = resolve(settings["templates"], where="periodic_eval.settings.templates")
    return {"every": int(spec.every), "task": spec.task, "rows": rows, "settings": settings}


def evaluate_heldout(cfg: DictConfig, shard_dir: UPath, model, text: TextProcessor) -> dict[str, float]:
    """Retrieval on the held-out samples (data.eval_where), at most eval_samples of them."""
    from components.eval.retrieval import heldout_retrieval

    rows = read_pairs(shard_dir, _where(cfg.data.get("eval_where"))).limit(cfg.eval_samples).take_all()
    if not rows:
        return {}
    captions = [json.loads(r["meta"])["caption"] for r in rows]
    return heldout_retrieval(model, text, [r["image"] for r in rows], captions)


def summary(outcome: dict[str, Any]) -> str:
    heldout = outcome["heldout"]
    lines = [f"pretrained {outcome['family']}: {outcome['step']} steps, {outcome['samples_seen']} samples seen "
             f"in {outcome['train_seconds']:.0f} s"]
    if heldout:
        lines.append(f"held-out retrieval ({heldout['images']} images, {heldout['texts']} captions): "
                     f"image->text R@1 {heldout['image_to_text_R1']:.3f}  R@5 {heldout['image_to_text_R5']:.3f} "
                     f"(chance {heldout['chance_image_to_text_R5']:.3f})  text->image R@5 "
                     f"{heldout['text_to_image_R5']:.3f}")
    lines.append(f"export: {outcome['export_dir']}")
    lines.append(f"checkpoint: {outcome['checkpoint']}")
    lines.append(mlflow_runs.registered_line(outcome))
    return "\n".join(lines)


def _where(value) -> dict[str, Any] | None:
    return OmegaConf.to_container(value, resolve=True) if value else None
