"""ClipCap's data: the CLIP image embedding of every image, computed once by Ray Data batch inference and cached
in Parquet (as ClipCap does offline), and the token streams of the two training sub-stages.

Cache rows: key, captions (a JSON list), split (the `split_field` of each sample), emb (the L2-normalised image
embedding, float32 [D]).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import ray
from upath import UPath

from components import storage
from components.cache import cached_parquet, content_key, file_digest
from components.eval.dataset import EvalFields, read_eval_rows

def image_embeddings(shard_dir: UPath, clip, cache_root: UPath, caption_field: str, split_field: str,
                     *, batch_size: int = 128, actors: int = 1, use_gpu: bool = False) -> UPath:
    """A Parquet directory (local or in an object store) of every sample's CLIP image embedding, computed once per
    (model weights, shards). clip: a components.eval.runner.ResolvedModel."""
    from components.eval.embed import Embedder

    manifest = shard_dir / "_manifest.json"
    key = content_key(file_digest(clip.directory / "model.safetensors"),
                      file_digest(manifest) if manifest.is_file() else str(shard_dir), caption_field, split_field)

    def write(partial: UPath) -> int:
        fields = EvalFields(caption=caption_field, labels={"split": split_field})
        embedded = read_eval_rows(shard_dir, fields).map_batches(
            Embedder, fn_constructor_kwargs={"model_dir": clip.for_workers, "side": "image",
                                             "device": "cuda" if use_gpu else "cpu"},
            batch_size=batch_size, concurrency=actors, num_gpus=1 if use_gpu else 0, batch_format="numpy")
        # Shuffled once: shards hold a concept's images next to each other, and training reads the cache in order.
        storage.ray_write_parquet(embedded.map_batches(_cache_columns, batch_format="pandas").random_shuffle(seed=0),
                                  partial)
        return sum(storage.parquet_rows(p) for p in storage.parquet_files(partial))

    return cached_parquet(cache_root, key, write, "image embeddings", "clipcap")


def _cache_columns(batch: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"key": batch["key"], "captions": batch["captions"], "split": batch["label_split"],
                         "emb": [np.asarray(e, dtype=np.float32) for e in batch["emb"]]})


def read_embeddings(cache_dir: UPath, split: str | None = None) -> pd.DataFrame:
    """The cached rows (of one split), with `caption` = the first caption and `emb` as float32 arrays."""
    frame = pd.concat([storage.read_parquet(p).to_pandas() for p in storage.parquet_files(cache_dir)],
                      ignore_index=True)
    if split is not None:
        frame = frame[frame["split"] == split].reset_index(drop=True)
    frame["caption"] = [(json.loads(c) or [""])[0] for c in frame["captions"]]
    frame["emb"] = [np.asarray(e, dtype=np.float32) for e in frame["emb"]]
    return frame


class CaptionTokens:
    """map_batches callable: caption -> input_ids + attention_mask (caption tokens then eos, right-padded with
    eos); `lead_eos` puts eos first too (the LM sub-stage has no image prefix to start from)."""

    def __init__(self, tokenizer_dir: str, max_length: int, lead_eos: bool):
        from components.models.tokenizer import load_tokenizer

        self.tokenizer, self.max_length, self.lead_eos = load_tokenizer(tokenizer_dir), max_length, lead_eos

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = encode_captions(self.tokenizer, [str(c) for c in batch["caption"]], self.max_length, self.lead_eos)
        out = {"input_ids": ids, "attention_mask": mask}
        if "emb" in batch:
            out["clip_embedding"] = np.stack(batch["emb"]).astype(np.float32)
        return out


def encode_captions(tokenizer, captions: list[str], max_length: int, lead_eos: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    eos = tokenizer.eos_token_id
    ids = np.full((len(captions), max_length), eos, dtype=np.int64)
    mask = np.zeros((len(captions), max_length), dtype=np.int64)
    for row, caption in enumerate(captions):
        tokens = tokenizer(caption, add_special_tokens=False)["input_ids"]
        tokens = ([eos] if lead_eos else []) + tokens[:max_length - 1 - int(lead_eos)] + [eos]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return ids, mask


@functools.lru_cache(maxsize=4)
def _tokens(tokenizer_dir: str, max_length: int, lead_eos: bool) -> CaptionTokens:
    return CaptionTokens(tokenizer_dir, max_length, lead_eos)


def tokenize(batch: dict[str, np.ndarray], tokenizer_dir: str, max_length: int, lead_eos: bool) -> dict[str, np.ndarray]:
    return _tokens(tokenizer_dir, max_length, lead_eos)(batch)


def training_stream(cache_dir: UPath, split: str, tokenizer_dir: str, max_length: int, *, with_embedding: bool,
                    text_files: tuple[str, ...] = (), in_memory: bool = False) -> ray.data.Dataset:
    """One pass over the cached rows of `split` as a Ray Dataset for Ray Train, tokenised by Ray tasks. The LM
    sub-stage streams captions only (after a leading eos), plus every line of `text_files`; captioning adds the
    image embedding. Streamed from Parquet (never held by the driver; the cache is shuffled when written), or,
    `in_memory`, tokenised once and held in Ray's object store: starting a pass from Parquet costs ~10 s here
    (file listing, tokenizer loading), which a small set pays every few steps (70-90% of a ClipCap step spent
    waiting on 1,309 rows)."""
    from components.train.data import cached_rows

    columns = ["captions", "split", "emb"] if with_embedding else ["captions", "split"]
    rows = cached_rows(cache_dir, columns, split).map_batches(_first_caption, batch_format="pandas")
    if text_files:
        files, filesystem = storage.arrow_paths([UPath(f) for f in text_files])
        lines = ray.data.read_text(files, filesystem=filesystem).map_batches(_text_lines, batch_format="pandas")
        rows = rows.union(lines)
    tokens = rows.map_batches(tokenize, fn_kwargs={"tokenizer_dir": tokenizer_dir, "max_length": max_length,
                                                   "lead_eos": not with_embedding},
                              batch_size=256, num_cpus=0.5, batch_format="numpy")
    return tokens.materialize() if in_memory else tokens


def _text_lines(batch: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"caption": batch["text"]})


def _first_caption(batch: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"caption": [(json.loads(c) or [""])[0] for c in batch["captions"]]})
    if "emb" in batch:
        out["emb"] = list(batch["emb"])
    return out
