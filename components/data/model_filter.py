"""DataComp's CLIP-score filter: score every image-text pair of a shard directory with a trained model and keep
the pairs above a threshold, or the top fraction, as a new shard directory in ingest's layout.

Three passes, each over shards (never the whole pool in one process):
    score   Ray Data actors (one model each, GPU when asked) read a shard's tar + Parquet and write a scored copy
            (_work/scored/<part>.parquet: the Parquet row + image bytes + `model_score`);
    decide  the driver reads only the score column: the threshold, or the (1 - keep_fraction) quantile;
    write   tasks turn each scored part into <part>.tar/.parquet + _dropped/<part>.parquet (reason `model_score`,
            the score kept) + stats, through ingest's shard writer, so the output reads like any ingest.
Rows outside `where` (e.g. the held-out split) pass through unscored-for-dropping: the filter shapes the
training pool only. Shards made elsewhere (img2dataset's, no manifest of ours; a directory or a brace pattern)
are read from their tars alone: every sample with an image is a row, its `.txt` the caption and its `.json`
fields the columns (`where` and the truth column name them). `_manifest.json` accounts for every input row, and
where a truth column says which captions are wrong (the salted corpus), the precision and recall of the drops.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from tqdm import tqdm
from upath import UPath

from components import storage
from components.data import shard_sets
from components.data.process_part import OK
from components.data.shard_sets import MANIFEST, tar_samples
from components.data.shards import write_shard

REASON = "model_score"


@dataclass(frozen=True)
class ScoreFilter:
    threshold: float | None = None      # keep pairs scoring >= threshold ...
    keep_fraction: float | None = None  # ... or the top fraction of the rows in scope
    where: dict[str, Any] = field(default_factory=dict)  # the rows the filter may drop ({}: all)
    truth_column: str | None = None     # a boolean column marking known-wrong captions: precision/recall

    def __post_init__(self):
        if (self.threshold is None) == (self.keep_fraction is None):
            raise ValueError("give exactly one of filter.threshold and filter.keep_fraction")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ValueError(f"filter.keep_fraction must be in (0, 1], got {self.keep_fraction}")


class PairScorer:
    """map_batches callable (an actor): {"part"} rows -> the part scored into `scored_dir`; returns its row count."""

    def __init__(self, model_dir: str, scored_dir: str, with_companions: bool, device: str = "cpu",
                 batch_size: int = 128):
        from components.eval.embed import load_export

        self.model, self.text = load_export(model_dir)
        self.model.to(device)
        self.scored_dir, self.with_companions = UPath(scored_dir), with_companions
        self.device, self.batch_size = device, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [self.score_part(UPath(str(tar))) for tar in batch["tar"]]
        return {"tar": list(batch["tar"]), "rows": rows}

    def score_part(self, tar: UPath) -> int:
        table = _companion_rows(tar) if self.with_companions else _tar_rows(tar)
        keys = table.column("key").to_pylist()
        image_bytes = table.column("image").to_pylist()
        captions = [c or "" for c in table.column("caption").to_pylist()]
        scores = np.concatenate([self.scores(image_bytes[i:i + self.batch_size], captions[i:i + self.batch_size])
                                 for i in range(0, len(keys), self.batch_size)] or [np.zeros(0, np.float32)])
        scored = table.append_column(REASON, pa.array(scores, pa.float32()))
        storage.write_parquet(scored, self.scored_dir / f"{tar.stem}.parquet")
        return len(keys)

    @torch.no_grad()
    def scores(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        """Cosine similarity of each image's and its own caption's global embedding."""
        from components.models.inference import image_tensor, text_inputs

        model = self.model
        image = model.image_embedding(model.encode_image(image_tensor(model, images).to(self.device)))
        inputs = text_inputs(model, self.text, captions)
        text = model.text_embedding(model.encode_text({k: v.to(self.device) for k, v in inputs.items()}))
        image, text = (torch.nn.functional.normalize(e.float(), dim=-1) for e in (image, text))
        return (image * text).sum(-1).cpu().numpy()


def _companion_rows(tar: UPath) -> pa.Table:
    """Our shard's rows: its Parquet companion's, with each row's image bytes from the tar."""
    table = storage.read_parquet(tar.with_suffix(".parquet"))
    images = {sample["key"]: sample["image"] for sample in tar_samples(tar)}
    keys = table.column("key").to_pylist()
    missing = [k for k in keys if k not in images]
    if missing:
        raise ValueError(f"shard {tar.stem}: {len(missing)} rows of its Parquet have no image in its tar "
                         f"(first key {missing[0]})")
    return table.append_column("image", pa.array([images[k] for k in keys], pa.binary()))


def _tar_rows(tar: UPath) -> pa.Table:
    """A shard made elsewhere, from its tar alone: one row per sample with an image, its JSON fields as columns
    (img2dataset's own `status`, "success", becomes ours), the caption from `.txt` (else the JSON's)."""
    rows = []
    for sample in tar_samples(tar):
        fields = {name: value for name, value in sample["json"].items() if name not in ("key", "image")}
        caption = sample["txt"] if sample["txt"] is not None else fields.get("caption")
        rows.append({**fields, "key": sample["key"], "caption": caption, "status": OK, "image": sample["image"]})
    if not rows:
        raise ValueError(f"shard {tar}: no sample with an image")
    return pa.Table.from_pylist(rows)


def _in_scope(table: pa.Table, where: dict[str, Any]) -> np.ndarray:
    scope = np.ones(table.num_rows, dtype=bool)
    for column, value in where.items():
        if column not in table.column_names:
            raise ValueError(f"filter.where: column {column!r} is not in the shards (columns: {table.column_names})")
        scope &= np.asarray(pc.equal(table.column(column), value).fill_null(False))
    return scope


def decide_threshold(scores: np.ndarray, spec: ScoreFilter) -> float:
    if spec.threshold is not None:
        return float(spec.threshold)
    if len(scores) == 0:
        return float("-inf")
    # The score of the last kept row: ties at the cut are kept with it.
    order = np.sort(scores)[::-1]
    return float(order[max(0, int(round(spec.keep_fraction * len(scores))) - 1)])


def write_filtered_part(scored_file: UPath, output_dir: UPath, spec: ScoreFilter, threshold: float
                        ) -> dict[str, Any]:
    """The scored part -> its shard in output_dir, with the in-scope rows below the threshold in _dropped/."""
    table = storage.read_parquet(scored_file)
    below = table.column(REASON).to_numpy(zero_copy_only=False) < threshold
    status = np.where(_in_scope(table, spec.where) & below, REASON, OK)
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status.tolist(), pa.string()))
    # The shard writer adds its own duplicate_of column (empty here: the source was already deduplicated).
    staging = scored_file.with_name(f"part-{scored_file.stem}.parquet")
    storage.write_parquet(table.drop_columns([c for c in ("duplicate_of",) if c in table.column_names]), staging)
    stats = write_shard(staging, output_dir / "_work" / "no-drops", output_dir, _image_format(table))
    staging.unlink()
    return stats


def _image_format(table: pa.Table) -> str:
    """The shard's image format, from its first image (the shard writer names the tar members by it)."""
    from PIL import Image

    first = table.column("image")[0].as_py() if table.num_rows else None
    if first is None:
        return "jpg"
    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[Image.open(io.BytesIO(first)).format]


def run_filter(source: str | UPath, output_dir: UPath, model_dir: str, spec: ScoreFilter, *, actors: int = 1,
               use_gpu: bool = False, batch_size: int = 128, progress: bool = True) -> dict[str, Any]:
    """Score, decide and write, from a shard set (ours, or a directory or brace pattern of shards made
    elsewhere) to a directory, local or in an object store; returns the manifest
    (also written to output_dir/_manifest.json). Every row's score is also kept in output_dir/_scores.parquet
    (key, score, in scope, truth) for choosing thresholds."""
    started = time.perf_counter()
    output_dir = UPath(output_dir)
    source_manifest = shard_sets.manifest(source)
    tars = ([UPath(source) / f"{shard['shard']}.tar" for shard in source_manifest["shards"]] if source_manifest
            else shard_sets.shard_files(source))
    parts = [tar.stem for tar in tars]
    scored_dir = output_dir / "_work" / "scored"
    storage.replace_output(output_dir, "output", inputs=(tars[0].parent,))
    scored_dir.mkdir(parents=True)

    scorer_args = {"model_dir": str(model_dir), "scored_dir": str(scored_dir),
                   "with_companions": source_manifest is not None, "device": "cuda" if use_gpu else "cpu",
                   "batch_size": batch_size}
    scored = ray.data.from_items([{"tar": str(t)} for t in tars], override_num_blocks=len(tars)).map_batches(
        PairScorer, fn_constructor_kwargs=scorer_args, batch_size=1, concurrency=max(1, min(actors, len(tars))),
        num_gpus=1 if use_gpu else 0)
    total, _ = shard_sets.sample_count(source)
    scored_rows = 0
    with tqdm(total=total, desc="score pairs", unit="pair", disable=not progress) as bar:
        for row in scored.iter_rows():
            bar.update(row["rows"])
            scored_rows += row["rows"]
    if source_manifest is None:  # shards made elsewhere: their samples with an image are the input
        source_manifest = {"dataset": tars[0].parent.name, "input_rows": scored_rows, "kept": scored_rows}

    columns = ["key", REASON, *spec.where, *([spec.truth_column] if spec.truth_column else [])]
    scores = pa.concat_tables(storage.read_parquet(scored_dir / f"{p}.parquet", columns=columns) for p in parts)
    if spec.truth_column and spec.truth_column not in scores.column_names:
        raise ValueError(f"filter.truth_column {spec.truth_column!r} is not in the shards")
    in_scope = _in_scope(scores, spec.where)
    threshold = decide_threshold(scores.column(REASON).to_numpy(zero_copy_only=False)[in_scope], spec)

    # One Ray task per part, so the write pass spreads over the cluster like the scoring pass.
    write = ray.remote(num_cpus=1)(write_filtered_part)
    pending = {write.remote(scored_dir / f"{p}.parquet", output_dir, spec, threshold): p for p in parts}
    by_part = {}
    with tqdm(total=len(parts), desc="write filtered shards", unit="shard", disable=not progress) as bar:
        while pending:
            (done,), _ = ray.wait(list(pending))
            by_part[pending.pop(done)] = ray.get(done)
            bar.update(1)
    stats = [by_part[p] for p in parts]
    scores = scores.append_column("in_scope", pa.array(in_scope))
    storage.write_parquet(scores, output_dir / "_scores.parquet")
    manifest = _manifest(source, source_manifest, spec, threshold, stats, scores, time.perf_counter() - started)
    storage.write_text(output_dir / "sizes.json", json.dumps({f"{s['part']}.tar": s["kept"] for s in stats}))
    storage.remove_tree(output_dir / "_work")
    storage.write_text(output_dir / MANIFEST, json.dumps(manifest, indent=2))  # last: the output is complete
    return manifest


def _manifest(source_dir: str | UPath, source: dict[str, Any], spec: ScoreFilter, threshold: float,
              stats: list[dict[str, Any]], scores: pa.Table, seconds: float) -> dict[str, Any]:
    total_in = sum(s["input"] for s in stats)
    kept = sum(s["kept"] for s in stats)
    dropped = sum(s["dropped"].get(REASON, 0) for s in stats)
    if kept + dropped != total_in or total_in != source["kept"]:
        raise RuntimeError(f"accounting broken: kept {kept} + dropped {dropped} != input {total_in} "
                           f"(source kept {source['kept']})")
    in_scope = scores.column("in_scope").to_numpy(zero_copy_only=False)
    values = scores.column(REASON).to_numpy(zero_copy_only=False)
    manifest = {
        "dataset": f"{source.get('dataset')}-filtered",
        "source_dir": str(source_dir),
        "source_rows": source["input_rows"],
        "input_rows": total_in,
        "kept": kept,
        "dropped": {REASON: dropped},
        "dropped_total": dropped,
        "in_scope": int(in_scope.sum()),
        "threshold": threshold,
        "filter": {"threshold": spec.threshold, "keep_fraction": spec.keep_fraction, "where": spec.where},
        "score_quantiles": {q: float(np.quantile(values[in_scope], q / 100)) if in_scope.any() else None
                            for q in (5, 25, 50, 75, 95)},
        "shards": [{"shard": s["part"], "kept": s["kept"], "input": s["input"]} for s in stats],
        "image": source.get("image"),
        "filters": source.get("filters"),
        "seconds": seconds,
    }
    if spec.truth_column:
        manifest["against_truth"] = removal_quality(
            scores.column(spec.truth_column).to_numpy(zero_copy_only=False).astype(bool)[in_scope],
            values[in_scope] < threshold)
    return manifest


def removal_quality(wrong: np.ndarray, removed: np.ndarray) -> dict[str, float | int]:
    """Precision and recall of removing the known-wrong rows."""
    hits = int((wrong & removed).sum())
    return {"wrong": int(wrong.sum()), "removed": int(removed.sum()), "removed_wrong": hits,
            "precision": hits / removed.sum() if removed.any() else 0.0,
            "recall": hits / wrong.sum() if wrong.any() else 0.0,
            "wrong_fraction_before": float(wrong.mean()) if len(wrong) else 0.0,
            "wrong_fraction_after": float((wrong & ~removed).sum() / max(1, (~removed).sum()))}
