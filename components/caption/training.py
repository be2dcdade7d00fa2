"""ClipCap training, driver side. pipelines/train_clipcap.py calls `run`.

CLIP image embeddings (cached, Ray Data) -> a byte-level BPE on the training captions -> decoder LM pretraining
on the captions (no pretrained GPT-2 here; skipped when `decoder.pretrained` is set) -> ClipCap training with the
chosen mapping and prefix length -> held-out captions: BLEU/CIDEr vs the nearest-neighbour baseline, and the
share of training images captioned exactly (memorisation) -> the captioner as a pyfunc in the registry.
Both training sub-stages run on the generic Ray Train + DeepSpeed loop (tasks "lm" and "caption"), each a child
MLflow run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components import storage
from components.caption.data import encode_captions, image_embeddings, read_embeddings, training_stream
from components.caption.metrics import (
    cache_blocks,
    caption_statistics,
    exact_match,
    nearest_captions,
    paired_bootstrap,
    scores_of,
)
from components.caption.model import EmbeddingWhitening, caption_texts
from components.tracking import mlflow_runs
from components.train.driver import (
    deepspeed_settings,
    describe_scale,
    log_loss_curve,
    stage_trainer,
    train_and_export,
    worker_config,
)
from components.train.tasks import build_captioner_module, build_decoder_module


@torch.no_grad()
def perplexity(decoder, tokenizer, captions: list[str], max_length: int, batch: int = 256) -> float:
    """exp(mean next-token cross-entropy) of the captions under the decoder (after a leading eos)."""
    decoder.eval()
    total, count = 0.0, 0
    for start in range(0, len(captions), batch):
        ids, mask = encode_captions(tokenizer, captions[start:start + batch], max_length, lead_eos=True)
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        labels = ids.masked_fill(mask == 0, -100)
        tokens = int((labels[:, 1:] != -100).sum())
        total += float(decoder(input_ids=ids, attention_mask=mask, labels=labels).loss) * tokens
        count += tokens
    return math.exp(total / max(1, count))


def run(cfg: DictConfig, shard_dir: Path, clip, run_id: str) -> dict[str, Any]:
    """clip: a components.eval.runner.ResolvedModel (any contrastive family with an image embedding)."""
    from components.models.tokenizer import load_tokenizer
    from components.train.trainer import resolve_use_gpu

    work = storage.location(cfg.work_dir)
    inference = cfg.inference
    cache = image_embeddings(shard_dir, clip, work / "embeddings", cfg.fields.caption,
                             cfg.fields.split, batch_size=inference.batch_size, actors=inference.actors,
                             use_gpu=resolve_use_gpu(inference.use_gpu))
    train, heldout = read_embeddings(cache, "train"), read_embeddings(cache, "test")
    if train.empty or heldout.empty:
        raise ValueError(f"no training or held-out rows in {shard_dir} (split field {cfg.fields.split!r})")
    print(f"[clipcap] {len(train)} training and {len(heldout)} held-out images, CLIP embedding dim "
          f"{train['emb'][0].shape[0]}", flush=True)
    decoder_dir, tokenizer_dir = _decoder(cfg, run_id, cache, train, heldout)
    tokenizer = load_tokenizer(tokenizer_dir)
    mlflow.set_tag("decoder.dir", decoder_dir)
    whitening = None
    if cfg.caption.whiten_ridge is not None:
        whitening = work / "whitening" / f"{run_id[:8]}.safetensors"
        if not storage.is_remote(whitening):
            whitening.parent.mkdir(parents=True, exist_ok=True)
        EmbeddingWhitening.fit(np.stack(train["emb"]), float(cfg.caption.whiten_ridge)).save(whitening)
    outcome = _train_captioner(cfg, run_id, cache, tokenizer, tokenizer_dir, decoder_dir,
                               int(train["emb"][0].shape[0]), len(train), whitening)
    outcome.update(evaluate_captioner(cfg, outcome["model"], tokenizer, cache, train, heldout))
    log_caption_grid(cfg, shard_dir, outcome["model"], tokenizer, heldout)
    mlflow_runs.log_metrics({k: v for k, v in outcome.items() if isinstance(v, float)})
    from components.caption.pyfunc import log_caption_model

    with storage.local_copy(outcome["export_dir"]) as captioner:
        info = log_caption_model(clip.directory, captioner, cfg.registry.model_name,
                                 OmegaConf.to_container(cfg.generate, resolve=True))
    outcome.update(model_uri=info.model_uri, registered_model=cfg.registry.model_name,
                   registered_version=getattr(info, "registered_model_version", None), clip=clip.uri)
    outcome.pop("model")
    return outcome


def _decoder(cfg, run_id, cache: UPath, train: pd.DataFrame, heldout: pd.DataFrame) -> tuple[str, str]:
    """(decoder, tokenizer) directories: `decoder.pretrained` with its own tokenizer, else a byte-level BPE on the
    training captions and LM pretraining, computed once per (captions, settings) so that the runs of a sweep
    share them."""
    from components.cache import computed_once, content_key, file_digest
    from components.models.tokenizer import train_bpe

    if cfg.decoder.pretrained:
        return str(cfg.decoder.pretrained), str(cfg.decoder.pretrained)
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("tokenizer", "decoder", "lm", "deepspeed")}
    key = content_key(cache.name, json.dumps(settings, sort_keys=True), str(cfg.max_caption_tokens),
                      *(file_digest(storage.location(f)) for f in cfg.lm.text_files))
    tokenizer_dir = storage.location(cfg.tokenizer.save_dir) / f"clipcap-{key}"  # read by the data workers

    def pretrain(partial: UPath) -> dict[str, float]:
        tokenizer = train_bpe(train["caption"], vocab_size=cfg.tokenizer.vocab_size)
        with storage.staged_directory(tokenizer_dir) as local:
            tokenizer.save_pretrained(local)
        return _pretrain_decoder(cfg, run_id, cache, tokenizer, str(tokenizer_dir), train, heldout,
                                 partial / "decoder")

    decoder_dir = computed_once(storage.location(cfg.work_dir) / "decoders", key, pretrain, "decoder LM",
                                "clipcap") / "decoder"
    return str(decoder_dir), str(decoder_dir)


def _pretrain_decoder(cfg, run_id, cache: UPath, tokenizer, tokenizer_dir: str, train: pd.DataFrame,
                      heldout: pd.DataFrame, export_dir: UPath) -> dict[str, float]:
    trainer_cfg = stage_trainer(cfg, "lm")
    spec = {"vocab_size": len(tokenizer), "preset": cfg.decoder.preset, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.eos_token_id,
            "overrides": OmegaConf.to_container(cfg.decoder.overrides, resolve=True)}
    with mlflow_runs.start_run(f"{cfg.mlflow.run_name}-lm", cfg.mlflow.experiment, tags={"stage": "clipcap-lm"}) as child:
        mlflow_runs.log_params({"lm": OmegaConf.to_container(trainer_cfg, resolve=True), "model": spec})
        heldout_captions = list(dict.fromkeys(heldout["caption"]))
        before = perplexity(build_decoder_module(spec), tokenizer, heldout_captions, cfg.max_caption_tokens + 1)
        deepspeed = deepspeed_settings(cfg, trainer_cfg)
        print(f"[clipcap] decoder LM pretraining: {describe_scale(trainer_cfg, deepspeed)}", flush=True)
        dataset = training_stream(cache, "train", tokenizer_dir, cfg.max_caption_tokens + 1, with_embedding=False,
                                  text_files=tuple(str(storage.location(f)) for f in cfg.lm.text_files),
                                  in_memory=len(train) <= cfg.in_memory_rows)
        train_config = {**worker_config(cfg, trainer_cfg, deepspeed, child.info.run_id), "task": "lm", "model": spec}
        trained = train_and_export(trainer_cfg, train_config, dataset, f"clipcap-lm-{run_id[:8]}", export_dir,
                                   tokenizer_dir, build_decoder_module)
        after = perplexity(trained.model, tokenizer, heldout_captions, cfg.max_caption_tokens + 1)
        mlflow_runs.log_metrics({"heldout.perplexity_init": before, "heldout.perplexity": after,
                                 "train_seconds": trained.seconds})
        log_loss_curve(child.info.run_id, "LM cross-entropy")
    print(f"[clipcap] decoder held-out perplexity {before:.1f} -> {after:.1f}", flush=True)
    return {"heldout_perplexity_init": round(before, 2), "heldout_perplexity": round(after, 2)}


def _train_captioner(cfg, run_id, cache: UPath, tokenizer, tokenizer_dir: str, decoder_dir: str,
                     clip_dim: int, training_rows: int, whitening: UPath | None) -> dict[str, Any]:
    trainer_cfg = stage_trainer(cfg, "caption")
    spec = {"clip_dim": clip_dim, "vocab_size": len(tokenizer), "prefix_length": int(cfg.caption.prefix_length),
            "mapping": cfg.caption.mapping, "pretrained": decoder_dir, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.eos_token_id, "mapping_layers": int(cfg.caption.mapping_layers),
            "whitening": str(whitening) if whitening else None}
    name = f"{cfg.mlflow.run_name}-{cfg.caption.mapping}-prefix{cfg.caption.prefix_length}"
    export_dir = storage.location(cfg.export_dir) / f"{cfg.caption.mapping}-prefix{cfg.caption.prefix_length}"
    with mlflow_runs.start_run(name, cfg.mlflow.experiment, tags={"stage": "clipcap-caption"}) as child:
        mlflow_runs.log_params({"caption": OmegaConf.to_container(trainer_cfg, resolve=True), "model": spec})
        deepspeed = deepspeed_settings(cfg, trainer_cfg)
        print(f"[clipcap] captioner ({cfg.caption.mapping} mapping, prefix {cfg.caption.prefix_length}): "
              f"{describe_scale(trainer_cfg, deepspeed)}", flush=True)
        dataset = training_stream(cache, "train", tokenizer_dir, cfg.max_caption_tokens + 1, with_embedding=True,
                                  in_memory=training_rows <= cfg.in_memory_rows)
        train_config = {**worker_config(cfg, trainer_cfg, deepspeed, child.info.run_id), "task": "caption",
                        "model": spec}
        trained = train_and_export(trainer_cfg, train_config, dataset, f"clipcap-{run_id[:8]}", export_dir,
                                   tokenizer_dir, build_captioner_module)
        mlflow_runs.log_metrics({"train_seconds": trained.seconds})
        log_loss_curve(child.info.run_id, "caption cross-entropy")
    return {"model": trained.model, "export_dir": str(export_dir), "step": trained.step,
            "train_seconds": trained.seconds, "caption_run_id": child.info.run_id}


def evaluate_captioner(cfg, model, tokenizer, cache: UPath, train: pd.DataFrame, heldout: pd.DataFrame
                       ) -> dict[str, Any]:
    """Held-out BLEU/CIDEr of the captioner and of the nearest-neighbour baseline; exact captions on training
    images (memorisation)."""
    settings = OmegaConf.to_container(cfg.generate, resolve=True)
    evaluated = heldout.head(cfg.eval_samples)
    generated = _captions(model, tokenizer, np.stack(evaluated["emb"]), settings)
    references = {key: json.loads(c) for key, c in zip(evaluated["key"], evaluated["captions"])}
    ours = caption_statistics(references, dict(zip(evaluated["key"], generated)))
    baseline = nearest_captions(np.stack(evaluated["emb"]), cache_blocks(cache, "train"))
    theirs = caption_statistics(references, dict(zip(evaluated["key"], baseline)))
    # A few hundred short held-out captions make BLEU-4 rest on a handful of 4-grams: the paired bootstrap says
    # whether the captioner and the baseline are told apart at all.
    compared = paired_bootstrap(ours, theirs)
    seen = train.sample(n=min(len(train), cfg.memorise_samples), random_state=0)
    seen_captions = _captions(model, tokenizer, np.stack(seen["emb"]), {**settings, "method": "greedy"})
    memorised = exact_match({k: json.loads(c) for k, c in zip(seen["key"], seen["captions"])},
                            dict(zip(seen["key"], seen_captions)))
    examples = pd.DataFrame({"key": evaluated["key"], "reference": [r[0] for r in references.values()],
                             "generated": generated, "nearest_neighbour": baseline})
    mlflow_runs.log_text(examples.to_csv(index=False), "captions/heldout.csv")
    return {**{f"heldout.{k}": v for k, v in scores_of(ours).items()},
            **{f"baseline.{k}": v for k, v in scores_of(theirs).items()},
            **{f"compare.{metric}.{k}": v for metric in COMPARED for k, v in compared[metric].items()},
            "train.exact_match": memorised, "heldout.images": float(len(evaluated)),
            "examples": examples.head(8).to_dict("records")}


def log_caption_grid(cfg, shard_dir: Path, model, tokenizer, heldout: pd.DataFrame, count: int = 12) -> None:
    """captions/heldout_grid.png: the first held-out images of the shards with the generated caption over the
    reference."""
    from components.eval.dataset import EvalFields, read_eval_rows
    from components.tracking.plots import sample_grid

    embeddings = dict(zip(heldout["key"], heldout["emb"]))
    fields = EvalFields(caption=cfg.fields.caption, labels={"split": cfg.fields.split})
    rows = [r for r in read_eval_rows(shard_dir, fields, where={cfg.fields.split: "test"}).limit(4 * count).take(
        4 * count) if r["key"] in embeddings][:count]
    if not rows:
        return
    generated = _captions(model, tokenizer, np.stack([embeddings[r["key"]] for r in rows]),
                          OmegaConf.to_container(cfg.generate, resolve=True))
    pairs = [(r["image"], f"{g} | ref: {(json.loads(r['captions']) or [''])[0]}") for r, g in zip(rows, generated)]
    mlflow_runs.log_image(sample_grid(pairs), "captions/heldout_grid.png")


def _captions(model, tokenizer, embeddings: np.ndarray, settings: dict) -> list[str]:
    return caption_texts(model, tokenizer, torch.from_numpy(embeddings), **settings)


COMPARED = ("BLEU-1", "BLEU-4", "CIDEr")  # the summary's columns


def summary(outcome: dict[str, Any]) -> str:
    lines = [f"ClipCap on {outcome['clip']}: {outcome['step']} steps in {outcome['train_seconds']:.0f} s",
             f"held-out ({outcome['heldout.images']:.0f} images)      BLEU-1 BLEU-4  CIDEr",
             f"  captioner                 {outcome['heldout.BLEU-1']:.3f}  {outcome['heldout.BLEU-4']:.3f}  "
             f"{outcome['heldout.CIDEr']:.3f}",
             f"  nearest-neighbour caption {outcome['baseline.BLEU-1']:.3f}  {outcome['baseline.BLEU-4']:.3f}  "
             f"{outcome['baseline.CIDEr']:.3f}",
             "captioner minus neighbour, 95% paired-bootstrap interval, share of resamples the captioner leads:"]
    lines += [f"  {m:<6} {outcome[f'compare.{m}.difference']:+.3f}  [{outcome[f'compare.{m}.low']:+.3f}, "
              f"{outcome[f'compare.{m}.high']:+.3f}]  {outcome[f'compare.{m}.ahead']:.0%}" for m in COMPARED]
    lines.append(f"training images captioned exactly: {outcome['train.exact_match']:.3f}")
    for example in outcome["examples"][:4]:
        lines.append(f"  {example['reference']!r} -> {example['generated']!r} (neighbour: "
                     f"{example['nearest_neighbour']!r})")
    lines.append(f"export: {outcome['export_dir']}")
    lines.append(mlflow_runs.registered_line(outcome))
    return "\n".join(lines)



SWEEP_COLUMNS = {"heldout.BLEU-4": "BLEU-4", "heldout.CIDEr": "CIDEr", "baseline.BLEU-4": "NN BLEU-4",
                 "baseline.CIDEr": "NN CIDEr", "compare.BLEU-4.ahead": "BLEU-4 ahead",
                 "compare.CIDEr.ahead": "CIDEr ahead", "train.exact_match": "train exact"}


def sweep_summary(client, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """One row per finished captioning run under the sweep's parent: its mapping, prefix length and metrics."""
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                   "tags.stage = 'clipcap' and attributes.status = 'FINISHED'")
    rows = [{"mapping": run.data.params.get("caption.mapping"),
             "prefix_length": int(run.data.params.get("caption.prefix_length", 0)),
             **{label: run.data.metrics.get(metric) for metric, label in SWEEP_COLUMNS.items()},
             "run_id": run.info.run_id} for run in children]
    columns = ["mapping", "prefix_length", *SWEEP_COLUMNS.values(), "run_id"]
    return pd.DataFrame(rows, columns=columns).sort_values(["mapping", "prefix_length"]).reset_index(drop=True)


def log_sweep_summary(client, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """The sweep's table (Markdown + CSV) and a bar chart of held-out CIDEr/BLEU-4 per setting against the
    nearest-neighbour baseline, logged to the parent run; rewritten after every run of the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = sweep_summary(client, experiment_id, parent_run_id)
    if table.empty:
        return table
    client.log_text(parent_run_id, markdown_table(table.drop(columns="run_id")), "sweep/summary.md")
    client.log_text(parent_run_id, table.to_csv(index=False), "sweep/summary.csv")
    labels = [f"{m}\nprefix {p}" for m, p in zip(table["mapping"], table["prefix_length"])]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(table), 3.6))
    for axis, metric in zip(axes, ("CIDEr", "BLEU-4")):
        axis.bar(range(len(table)), table[metric].fillna(0), color="tab:blue", label="captioner")
        axis.axhline(table[f"NN {metric}"].mean(), color="tab:red", linestyle="--", label="nearest neighbour")
        axis.set_xticks(range(len(table)), labels, fontsize=8)
        axis.set_title(f"held-out {metric}")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    client.log_figure(parent_run_id, figure, "sweep/summary.png")
    plt.close(figure)
    best = table.loc[table["CIDEr"].fillna(-1).idxmax()]
    for name, value in (("best.CIDEr", best["CIDEr"]), ("best.prefix_length", best["prefix_length"]),
                        ("runs", len(table))):
        client.log_metric(parent_run_id, name, float(value))
    return table


def markdown_table(frame: pd.DataFrame) -> str:
    """A Markdown table, floats to 3 decimals (printed at the end of a sweep and logged to its parent run)."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
