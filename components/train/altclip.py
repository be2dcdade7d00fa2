"""AltCLIP's two stages, driver side. pipelines/distill_altclip.py calls `run`.

Stage 1, teacher learning: a multilingual student text tower learns to put every translation of an English
sentence where the frozen CLIP teacher puts the English sentence (MSE; no images). The teacher's features are
computed once by Ray Data batch inference and cached in Parquet beside the pairs.
Stage 2, locked-image contrastive tuning (LiT): the student keeps training with the contrastive loss on
image-caption pairs whose caption language is drawn per example, the teacher's image tower frozen.

Both stages run on the generic Ray Train + DeepSpeed loop (components/train/loop.py) as tasks "distill" and
"contrastive"; each is a child MLflow run of the pipeline's run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components import storage
from components.cache import cached_parquet, content_key, file_digest
from components.data.parallel_text import builtin_parallel_text, fingerprint, read_parallel_text
from components.models.factory import saved_family
from components.models.text import TextProcessor
from components.runtime import path
from components.tracking import mlflow_runs
from components.train.data import TextConfig, parallel_text_dataset, split_rows
from components.train.driver import (
    deepspeed_settings,
    describe_scale,
    log_loss_curve,
    stage_trainer,
    train_and_export,
    worker_config,
)
from components.train.pretraining import evaluate_heldout, image_text_dataset
from components.train.tasks import build_spec_model


# -- parallel text and the teacher's targets ---------------------------------------------------------------------
def parallel_pairs(cfg: DictConfig) -> pd.DataFrame:
    """The configured parallel text, or the built-in one (the corpus' names in its languages + CLDR)."""
    spec = cfg.parallel_text
    if spec.path:
        return read_parallel_text(path(spec.path), spec.test_fraction)
    corpus_dir = path(cfg.data.corpus_dir) if cfg.data.get("corpus_dir") else None
    if corpus_dir is None or not corpus_dir.is_dir():
        raise FileNotFoundError("no parallel text: set parallel_text.path to a TSV/CSV/Parquet with src, tgt, lang "
                                "(the built-in one needs the emoji corpus, data=emoji)")
    return builtin_parallel_text(corpus_dir, list(cfg.fields.languages), cldr=bool(spec.cldr))


class TeacherTargets:
    """map_batches callable (an actor): the teacher's projected text features of each row's src, each distinct
    sentence of a batch embedded once (pairs arrive sorted by src)."""

    def __init__(self, teacher_dir: str, device: str = "cpu"):
        from transformers.utils import logging as transformers_logging

        from components.eval.embed import load_export

        transformers_logging.disable_progress_bar()
        self.model, self.text = load_export(teacher_dir)
        self.model.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from components.models.inference import text_inputs

        sentences, index = np.unique(batch["src"].astype(str), return_inverse=True)
        inputs = text_inputs(self.model, self.text, list(sentences))
        features = self.model.text_features({k: v.to(self.device) for k, v in inputs.items()}).float().cpu().numpy()
        return {**batch, "target": features[index]}


def teacher_targets(pairs: pd.DataFrame, teacher, cache_root: UPath, *, batch_size: int, actors: int,
                    use_gpu: bool) -> UPath:
    """A Parquet directory (local or in an object store) of the pairs with the teacher's `target`, computed once
    per (teacher weights, pairs). teacher: a components.eval.runner.ResolvedModel."""
    key = content_key(file_digest(teacher.directory / "model.safetensors"), fingerprint(pairs))

    def write(partial: UPath) -> int:
        # Through a Parquet file (row groups become Ray Data blocks) rather than from_pandas: the pairs of a
        # user's file can be large, and the driver then holds them once.
        source = cache_root / f"{key}.pairs.parquet"
        with storage.atomic_write(source) as file:
            pairs[["src", "tgt", "lang", "split"]].to_parquet(file, row_group_size=20_000, index=False)
        embedded = storage.ray_read_parquet(source).map_batches(
            TeacherTargets, fn_constructor_kwargs={"teacher_dir": teacher.for_workers,
                                                   "device": "cuda" if use_gpu else "cpu"},
            batch_size=batch_size, concurrency=actors, num_gpus=1 if use_gpu else 0, batch_format="numpy")
        # Pairs arrive grouped by English sentence (for the per-batch dedup above); training batches must not
        # be, or each holds a handful of sentences. Shuffled once here, for every run that reuses the cache.
        storage.ray_write_parquet(embedded.random_shuffle(seed=0), partial)
        source.unlink()
        return len(pairs)

    return cached_parquet(cache_root, key, write, f"teacher targets of {len(pairs)} pairs", "altclip")


def read_targets(targets_dir: UPath, split: str) -> pd.DataFrame:
    table = storage.read_parquet(targets_dir, filters=[("split", "=", split)])
    frame = table.drop(["target"]).to_pandas()
    frame["target"] = list(np.stack(table.column("target").to_numpy(zero_copy_only=False)))
    return frame


# -- stage 1 metrics -----------------------------------------------------------------------------------------
@torch.no_grad()
def student_features(model, text: TextProcessor, texts: list[str], batch: int = 256) -> np.ndarray:
    from components.models.inference import text_inputs

    model.eval()
    return torch.cat([model.text_features(text_inputs(model, text, texts[i:i + batch])).float()
                      for i in range(0, len(texts), batch)]).numpy()


def distill_metrics(model, text: TextProcessor, heldout: pd.DataFrame, probe_language: str, distractors: int = 10,
                    seed: int = 0) -> dict[str, float]:
    """On parallel pairs: MSE to the teacher's targets, and for `probe_language` whether each sentence lands
    nearest (cosine) its own English sentence's teacher embedding: among every English sentence of the pairs
    (top1, top10), and among its own plus `distractors` random others (vs<distractors>)."""
    student = student_features(model, text, list(heldout["tgt"]))
    targets = np.stack(heldout["target"])
    metrics = {"mse": float(((student - targets) ** 2).mean()),
               "cosine": float(np.mean(np.sum(_unit(student) * _unit(targets), axis=1)))}
    probe = heldout["lang"].to_numpy() == probe_language
    if probe.any():
        english = heldout.drop_duplicates("src")
        reference = _unit(np.stack(english["target"]))
        position = {src: i for i, src in enumerate(english["src"])}
        scores = _unit(student[probe]) @ reference.T
        truth = np.array([position[s] for s in heldout["src"][probe]])
        # Rank of the right English sentence among all of them (0 = nearest); ties count against.
        ranks = (scores > scores[np.arange(len(truth)), truth][:, None]).sum(axis=1)
        metrics[f"{probe_language}_top1"] = float(np.mean(ranks < 1))
        metrics[f"{probe_language}_top10"] = float(np.mean(ranks < 10))
        rng = np.random.default_rng(seed)
        count = min(distractors, len(english) - 1)
        rows = np.arange(len(truth))
        others = np.stack([rng.choice(np.delete(np.arange(len(english)), t), size=count, replace=False) for t in truth])
        right = scores[rows, truth]
        metrics[f"{probe_language}_vs{count}"] = float(np.mean(right > scores[rows[:, None], others].max(axis=1)))
        metrics[f"{probe_language}_vs{count}_chance"] = 1.0 / (count + 1)
        metrics[f"{probe_language}_pairs"] = int(probe.sum())
        metrics[f"{probe_language}_chance"] = 1.0 / len(english)
    return metrics


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pairs_sample(targets_dir: UPath, split: str, rows: int, probe_language: str, seed: int = 0) -> pd.DataFrame:
    """At most `rows` pairs of `split`, up to half of them in `probe_language`."""
    pairs = read_targets(targets_dir, split)
    probe = pairs[pairs["lang"] == probe_language]
    probe = probe.sample(n=min(len(probe), rows // 2), random_state=seed)
    rest = pairs[pairs["lang"] != probe_language]
    rest = rest.sample(n=min(len(rest), max(0, rows - len(probe))), random_state=seed)
    return pd.concat([probe, rest], ignore_index=True)


# -- the run -------------------------------------------------------------------------------------------------
def student_tokenizer(cfg: DictConfig, pairs: pd.DataFrame, out_dir: UPath):
    """cfg.tokenizer.path, else student.pretrained's, else a byte-level BPE in XLM-R's layout trained on both
    sides of the training pairs."""
    from components.models.tokenizer import prepare_tokenizer

    def texts() -> pd.Series:
        train = pairs[pairs["split"] == "train"]
        return pd.concat([train["src"].drop_duplicates(), train["tgt"]])

    return prepare_tokenizer(cfg.tokenizer.path or cfg.student.pretrained, texts, out_dir, cfg.tokenizer.vocab_size,
                             layout="xlmr")


def run(cfg: DictConfig, shard_dir: Path, teacher, run_id: str) -> dict[str, Any]:
    """teacher: a components.eval.runner.ResolvedModel of a clip model."""
    family = saved_family(teacher.directory)
    if family != "clip":
        raise ValueError(f"the teacher must be a clip model; {teacher.uri} is a {family!r} model")
    work = storage.location(cfg.work_dir)
    pairs = parallel_pairs(cfg)
    counts = pairs.groupby("split").size().to_dict()
    print(f"[altclip] parallel text: {len(pairs)} pairs in {pairs['lang'].nunique()} languages "
          f"({counts.get('train', 0)} train, {counts.get('test', 0)} held out)", flush=True)
    mlflow_runs.log_metrics({"parallel.pairs": len(pairs), "parallel.languages": pairs["lang"].nunique()})
    tokenizer_dir = storage.location(cfg.tokenizer.save_dir) / f"altclip-{run_id[:8]}"
    tokenizer = student_tokenizer(cfg, pairs, tokenizer_dir)
    inference = cfg.inference
    from components.train.trainer import resolve_use_gpu

    targets_dir = teacher_targets(pairs, teacher, work / "teacher_targets",
                                  batch_size=inference.batch_size, actors=inference.actors,
                                  use_gpu=resolve_use_gpu(inference.use_gpu))

    stage1 = _stage1(cfg, run_id, teacher, tokenizer, str(tokenizer_dir), targets_dir)
    stage2 = _stage2(cfg, run_id, shard_dir, str(tokenizer_dir), stage1["export_dir"])
    outcome = {"teacher": teacher.uri, "stage1": stage1, "stage2": stage2}
    client = mlflow.tracking.MlflowClient()
    if stage2.get("registered_version"):
        lineage = _lineage_tags(teacher)
        for key, value in lineage.items():
            client.set_model_version_tag(cfg.registry.model_name, stage2["registered_version"], key, value)
    if cfg.compare.enabled:
        outcome["compare"] = compare_models(cfg, shard_dir, {"teacher": str(teacher.directory),
                                                             "stage1": stage1["export_dir"],
                                                             "altclip": stage2["export_dir"]})
    return outcome


def _lineage_tags(teacher) -> dict[str, str]:
    tags = {"teacher.uri": teacher.uri}
    if teacher.run_id:
        tags["teacher.run_id"] = teacher.run_id
    if teacher.registered:
        tags["teacher.model"], tags["teacher.version"] = teacher.registered
    return tags


def _stage1(cfg, run_id, teacher, tokenizer, tokenizer_dir: str, targets_dir: UPath) -> dict:
    trainer_cfg = stage_trainer(cfg, "stage1")
    spec = {"family": "altclip", "preset": cfg.student.preset, "teacher": teacher.for_workers,
            "lock_image": True, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            **OmegaConf.to_container(cfg.student.overrides, resolve=True)}
    if cfg.student.pretrained:
        spec["text_pretrained"] = cfg.student.pretrained
    with mlflow_runs.start_run(f"{cfg.mlflow.run_name}-stage1-distill", cfg.mlflow.experiment,
                               tags={"stage": "altclip-distill", **_lineage_tags(teacher)}) as child:
        mlflow_runs.log_params({"stage1": OmegaConf.to_container(trainer_cfg, resolve=True), "model": spec})
        model = build_spec_model(spec)
        text = model.text_processor(tokenizer_dir).loaded()
        # Held-out concepts (generalisation) and training concepts (what the student fitted), the same size.
        samples = {split: pairs_sample(targets_dir, split, cfg.heldout_pairs, cfg.probe_language)
                   for split in ("test", "train")}
        before = distill_metrics(model, text, samples["test"], cfg.probe_language)
        deepspeed = deepspeed_settings(cfg, trainer_cfg)
        print(f"[altclip] stage 1 (teacher learning): student {model.num_parameters(trainable_only=True) / 1e6:.1f}M "
              f"trainable parameters, {describe_scale(trainer_cfg, deepspeed)}", flush=True)
        in_memory = split_rows(targets_dir, "train") <= cfg.in_memory_rows
        dataset = parallel_text_dataset(targets_dir, text, "train", in_memory)
        train_config = {**worker_config(cfg, trainer_cfg, deepspeed, child.info.run_id), "task": "distill",
                        "model": spec, "tokenizer_dir": tokenizer_dir}
        export_dir = storage.location(cfg.export_dir) / "stage1"
        trained = train_and_export(trainer_cfg, train_config, dataset, f"altclip-stage1-{run_id[:8]}", export_dir,
                                   tokenizer_dir)
        after = distill_metrics(trained.model, text, samples["test"], cfg.probe_language)
        seen = distill_metrics(trained.model, text, samples["train"], cfg.probe_language)
        mlflow_runs.log_metrics({**{f"heldout.{k}": v for k, v in after.items()},
                                 **{f"heldout.init_{k}": v for k, v in before.items()},
                                 **{f"train.{k}": v for k, v in seen.items()},
                                 "train_seconds": trained.seconds})
        log_loss_curve(child.info.run_id, "MSE to the teacher")
        mlflow.set_tag("checkpoint", trained.checkpoint)
        from components.tracking.pyfunc import log_embedding_model

        with storage.local_copy(export_dir) as local_export:
            info = log_embedding_model(local_export, None)
    return {"export_dir": str(export_dir), "model_uri": info.model_uri, "run_id": child.info.run_id,
            "step": trained.step, "train_seconds": trained.seconds, "before": before, "after": after, "seen": seen}


def _stage2(cfg, run_id, shard_dir: Path, tokenizer_dir: str, stage1_dir: str) -> dict:
    trainer_cfg = stage_trainer(cfg, "stage2")
    spec = {"family": "altclip", "pretrained": stage1_dir, "lock_image": True}
    with mlflow_runs.start_run(f"{cfg.mlflow.run_name}-stage2-lit", cfg.mlflow.experiment,
                               tags={"stage": "altclip-contrastive"}) as child:
        mlflow_runs.log_params({"stage2": OmegaConf.to_container(trainer_cfg, resolve=True), "model": spec})
        model = build_spec_model(spec)
        deepspeed = deepspeed_settings(cfg, trainer_cfg)
        print(f"[altclip] stage 2 (contrastive, image tower locked): "
              f"{model.num_parameters(trainable_only=True) / 1e6:.1f}M trainable parameters, "
              f"{describe_scale(trainer_cfg, deepspeed)}", flush=True)
        text = model.text_processor(tokenizer_dir).loaded()
        captions = TextConfig(text, caption_choices=tuple(cfg.fields.languages.values()))
        dataset = image_text_dataset(cfg, trainer_cfg, shard_dir, model, captions)
        train_config = {**worker_config(cfg, trainer_cfg, deepspeed, child.info.run_id), "task": "contrastive",
                        "model": spec, "loss": OmegaConf.to_container(cfg.loss, resolve=True),
                        "tokenizer_dir": tokenizer_dir}
        export_dir = storage.location(cfg.export_dir) / "final"
        trained = train_and_export(trainer_cfg, train_config, dataset, f"altclip-stage2-{run_id[:8]}", export_dir,
                                   tokenizer_dir)
        metrics = evaluate_heldout(cfg, shard_dir, trained.model, text)
        mlflow_runs.log_metrics({**{f"heldout.{k}": v for k, v in metrics.items()}, "train_seconds": trained.seconds})
        log_loss_curve(child.info.run_id)
        mlflow.set_tag("checkpoint", trained.checkpoint)
        from components.tracking.pyfunc import log_embedding_model

        with storage.local_copy(export_dir) as local_export:
            info = log_embedding_model(local_export, cfg.registry.model_name)
    return {"export_dir": str(export_dir), "model_uri": info.model_uri, "run_id": child.info.run_id,
            "step": trained.step, "train_seconds": trained.seconds, "heldout": metrics,
            "registered_model": cfg.registry.model_name,
            "registered_version": getattr(info, "registered_model_version", None)}


# -- the comparison (the evaluation stage's multilingual retrieval) -----------------------------------------
def compare_models(cfg: DictConfig, shard_dir: UPath, models: dict[str, str]) -> dict[str, dict[str, float]]:
    """Multilingual retrieval on the held-out rows for each model; {model: {lang: R@5}}, a table and a chart in the
    pipeline's MLflow run. The images are embedded once, by the first model: the teacher's image tower is every
    model's (stage 1 copies it, stage 2 keeps it locked; tests/test_altclip.py checks it bit for bit)."""
    from components.eval import runner
    from components.eval.plots import model_language_chart
    from components.eval.store import EmbeddingStore
    from components.train.trainer import resolve_use_gpu

    compare = cfg.compare
    settings = {"fields": OmegaConf.to_container(cfg.fields, resolve=True), "batch_size": compare.batch_size,
                "actors": cfg.inference.actors, "use_gpu": resolve_use_gpu(cfg.inference.use_gpu),
                "where": dict(cfg.data.get("eval_where") or {}),
                "limit": None, "tasks": ["multilingual_retrieval"], "block": compare.block,
                "dataset_name": shard_dir.name,
                "task_settings": {"multilingual_retrieval": {"languages": compare.languages,
                                                             "metric": compare.metric}}}
    table: dict[str, dict[str, float]] = {}
    scratch = runner.scratch_dir()
    images = None
    try:
        for name, directory in models.items():
            with storage.local_copy(directory) as local:
                results = runner.evaluate(settings, shard_dir, runner.ResolvedModel(local, directory, shared=directory),
                                          scratch / name, progress=False, images=images)
            images = images or EmbeddingStore(runner.image_store_dir(scratch / name))
            table[name] = {r["language"]: float(r["metrics"][compare.metric]) for r in results}
            mlflow_runs.log_metrics({f"compare.{name}.{lang}.{compare.metric}": v for lang, v in table[name].items()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = comparison_summary(table)
    mlflow_runs.log_metrics({f"compare.{k}": v for k, v in summary.items()})
    mlflow_runs.log_json({"metric": compare.metric, "per_language": table, "summary": summary},
                         "compare/multilingual_retrieval.json")
    mlflow.log_image(model_language_chart(table, compare.metric), "compare/multilingual_retrieval.png")
    return table


def comparison_summary(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per model: English, the mean over the other languages, and their ratio (the issue's goals use these)."""
    out = {}
    for name, per_language in table.items():
        others = [v for lang, v in per_language.items() if lang != "en"]
        english = per_language.get("en")
        mean_others = float(np.mean(others)) if others else float("nan")
        out[f"{name}.en"] = english if english is not None else float("nan")
        out[f"{name}.mean_non_en"] = mean_others
        out[f"{name}.non_en_over_en"] = mean_others / english if english else float("nan")
    return out


def comparison_table(table: dict[str, dict[str, float]], metric: str) -> str:
    models = list(table)
    languages = sorted({lang for values in table.values() for lang in values}, key=lambda l: (l != "en", l))
    lines = [f"{metric:>8} " + " ".join(f"{m:>9}" for m in models)]
    for lang in languages:
        lines.append(f"{lang:>8} " + " ".join(f"{table[m].get(lang, float('nan')):9.3f}" for m in models))
    summary = comparison_summary(table)
    lines.append(f"{'non-en':>8} " + " ".join(f"{summary[f'{m}.mean_non_en']:9.3f}" for m in models))
    return "\n".join(lines)


def summary(outcome: dict[str, Any], cfg: DictConfig) -> str:
    stage1, stage2 = outcome["stage1"], outcome["stage2"]
    before, after = stage1["before"], stage1["after"]
    probe = cfg.probe_language
    lines = [f"AltCLIP from teacher {outcome['teacher']}",
             f"stage 1 (teacher learning): {stage1['step']} steps in {stage1['train_seconds']:.0f} s; held-out MSE "
             f"{before['mse']:.4f} -> {after['mse']:.4f}, cosine to teacher {before['cosine']:.3f} -> "
             f"{after['cosine']:.3f}"]
    for name, metrics in (("held-out", after), ("training", stage1["seen"])):
        if f"{probe}_top1" in metrics:
            # Small sets have fewer than 10 distractors per sentence (distill_metrics names the count).
            count = next(k for k in metrics if k.startswith(f"{probe}_vs") and not k.endswith("_chance"))
            distractors = (f"; against {count.removeprefix(f'{probe}_vs')} distractors {metrics[count]:.3f} "
                           f"(chance {metrics[f'{count}_chance']:.3f})")
            lines.append(f"  {name} concepts, {metrics[f'{probe}_pairs']} {probe} sentences: the nearest English "
                         f"teacher embedding is its own {metrics[f'{probe}_top1']:.3f} (chance "
                         f"{metrics[f'{probe}_chance']:.4f}), in the top 10 {metrics[f'{probe}_top10']:.3f}"
                         + distractors)
    heldout = stage2["heldout"]
    lines.append(f"stage 2 (contrastive, image tower locked): {stage2['step']} steps in "
                 f"{stage2['train_seconds']:.0f} s" + (f"; English held-out image->text R@5 "
                                                       f"{heldout['image_to_text_R5']:.3f}" if heldout else ""))
    if "compare" in outcome:
        lines.append(f"multilingual retrieval on held-out concepts ({cfg.compare.metric}):")
        lines.append(comparison_table(outcome["compare"], cfg.compare.metric))
    lines.append(f"export: {stage2['export_dir']} (stage 1: {stage1['export_dir']})")
    lines.append(mlflow_runs.registered_line(stage2))
    return "\n".join(lines)
