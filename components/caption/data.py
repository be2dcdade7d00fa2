"""ClipCap's data: the CLIP image embedding of every image, computed once by Ray Data batch inference and cached
in Parquet (as ClipCap does offline), and the token streams of the two training sub-stages.

Cache rows: key, captions (a JSON list), split (the `split_field` of each sample), emb (the L2-normalised image
embedding, float32 [D]).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from components.eval.dataset import EvalFields, read_eval_rows

CACHE_DONE = "_embeddings.json"


def image_embeddings(shard_dir: Path, clip_dir: Path, cache_root: Path, caption_field: str, split_field: str,
                     *, batch_size: int = 128, actors: int = 1, use_gpu: bool = False) -> Path:
    """A Parquet directory of every sample's CLIP image embedding, computed once per (model weights, shards)."""
    from components.eval.embed import Embedder

    manifest = (shard_dir / "_manifest.json").read_text() if (shard_dir / "_manifest.json").is_file() else str(shard_dir)
    digest = hashlib.sha1()
    with open(clip_dir / "model.safetensors", "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    key = hashlib.sha1(f"{digest.hexdigest()}-{manifest}-{caption_field}-{split_field}".encode()).hexdigest()[:16]
    out = cache_root / key
    if (out / CACHE_DONE).is_file():
        print(f"[clipcap] image embeddings cached in {out}", flush=True)
        return out
    partial = cache_root / f"{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    fields = EvalFields(caption=caption_field, labels={"split": split_field})
    embedded = read_eval_rows(shard_dir, fields).map_batches(
        Embedder, fn_constructor_kwargs={"model_dir": str(clip_dir), "side": "image",
                                         "device": "cuda" if use_gpu else "cpu"},
        batch_size=batch_size, concurrency=actors, num_gpus=1 if use_gpu else 0, batch_format="numpy")
    embedded.map_batches(_cache_columns, batch_format="pandas").write_parquet(str(partial))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    rows = sum(len(pd.read_parquet(p, columns=["key"])) for p in out.glob("*.parquet"))
    (out / CACHE_DONE).write_text(json.dumps({"rows": rows, "model": str(clip_dir)}) + "\n")
    print(f"[clipcap] {rows} image embeddings written to {out}", flush=True)
    return out


def _cache_columns(batch: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"key": batch["key"], "captions": batch["captions"], "split": batch["label_split"],
                         "emb": [np.asarray(e, dtype=np.float32) for e in batch["emb"]]})


def read_embeddings(cache_dir: Path, split: str | None = None) -> pd.DataFrame:
    """The cached rows (of one split), with `caption` = the first caption and `emb` as float32 arrays."""
    frame = pd.concat([pd.read_parquet(p) for p in sorted(cache_dir.glob("*.parquet"))], ignore_index=True)
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


def training_stream(cache_dir: Path, split: str, tokenizer_dir: str, max_length: int, *, with_embedding: bool,
                    passes: int, seed: int = 0, text_files: tuple[str, ...] = ()) -> ray.data.Dataset:
    """The cached rows of `split` as a Ray Dataset for Ray Train, streamed (never held by the driver): `passes`
    passes in randomised block order, tokenised by Ray tasks. The LM sub-stage streams captions only (after a
    leading eos), plus every line of `text_files`; captioning adds the image embedding."""
    columns = ["captions", "split", "emb"] if with_embedding else ["captions", "split"]
    rows = ray.data.read_parquet(str(cache_dir), columns=columns).filter(expr=f"split == '{split}'")
    rows = rows.map_batches(_first_caption, batch_format="pandas")
    if text_files:
        lines = ray.data.read_text(list(text_files)).map_batches(
            lambda b: pd.DataFrame({"caption": b["text"]}), batch_format="pandas")
        rows = rows.union(lines)
    orders = [rows.randomize_block_order(seed=seed + i) for i in range(max(1, passes))]
    rows = orders[0].union(*orders[1:]) if len(orders) > 1 else orders[0]
    return rows.map_batches(tokenize, fn_kwargs={"tokenizer_dir": tokenizer_dir, "max_length": max_length,
                                                 "lead_eos": not with_embedding},
                            batch_size=256, num_cpus=0.5, batch_format="numpy")


def _first_caption(batch: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"caption": [(json.loads(c) or [""])[0] for c in batch["captions"]]})
    if "emb" in batch:
        out["emb"] = list(batch["emb"])
    return out
