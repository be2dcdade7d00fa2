"""Shard sets made elsewhere: directories and brace patterns, their sizes from whichever companion is there, and
their captions with or without Parquet companions."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset

from components.data import shard_sets
from components.models.tokenizer import captions_from_shards

CAPTIONS = [["red apple", "green pear", "ripe banana"], ["blue whale", "grey seal"]]


def write_shards(folder: Path, meta: bool = True) -> list[Path]:
    """Two tars as open_clip's tools write them: {key}.jpg + {key}.txt (+ {key}.json), one caption-less member
    that is no sample (a stray .txt without an image is not counted)."""
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for index, captions in enumerate(CAPTIONS):
        tar = folder / f"{index:05d}.tar"
        with webdataset.TarWriter(str(tar), encoder=False) as writer:
            for number, caption in enumerate(captions):
                sample = {"__key__": f"{index:05d}{number:04d}", "jpg": b"\xff\xd8 not decoded here",
                          "txt": caption.encode()}
                if meta:
                    sample["json"] = json.dumps({"caption": caption, "split": "test" if number else "train"}).encode()
                writer.write(sample)
            writer.write({"__key__": f"{index:05d}9999", "txt": b"an orphan caption"})
        tars.append(tar)
    return tars


def test_a_directory_or_a_pattern_names_the_tars_and_a_missing_shard_is_one_clear_error(tmp_path):
    tars = write_shards(tmp_path / "shards")
    assert shard_sets.shard_files(tmp_path / "shards") == tars
    assert shard_sets.shard_files(f"{tmp_path}/shards/{{00000..00001}}.tar") == tars
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 shards of .* do not exist \(first: .*00002.tar\)"):
        shard_sets.shard_files(f"{tmp_path}/shards/{{00000..00002}}.tar")
    with pytest.raises(FileNotFoundError, match="no WebDataset shards"):
        shard_sets.shard_files(tmp_path / "nowhere")


def test_the_sample_count_comes_from_the_first_companion_present(tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder)
    assert shard_sets.sample_count(folder) == (5, "the tars")
    # img2dataset's per-shard stats (they count downloads: the orphan caption is not among them)
    for index, captions in enumerate(CAPTIONS):
        (folder / f"{index:05d}_stats.json").write_text(json.dumps({"count": 9, "successes": len(captions) + 10}))
    assert shard_sets.sample_count(folder) == (25, "*_stats.json")
    assert shard_sets.sample_count(f"{folder}/{{00001..00001}}.tar") == (12, "*_stats.json")
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 30, "00001.tar": 20}))
    assert shard_sets.sample_count(folder) == (50, "sizes.json")
    (folder / shard_sets.MANIFEST).write_text(json.dumps({"kept": 7}))
    assert shard_sets.sample_count(folder) == (7, shard_sets.MANIFEST)
    # A pattern may name some of a directory's shards: the manifest, which counts them all, is not used.
    assert shard_sets.sample_count(f"{folder}/{{00000..00000}}.tar") == (30, "sizes.json")


@pytest.mark.parametrize("meta", [True, False])
def test_captions_come_from_the_tars_without_parquet_companions(tmp_path, meta):
    write_shards(tmp_path, meta=meta)
    everything = [c for captions in CAPTIONS for c in captions]
    assert list(captions_from_shards(tmp_path)) == everything
    assert list(captions_from_shards(tmp_path, limit=4)) == everything[:4]
    if meta:  # `where` reads the JSON fields
        assert list(captions_from_shards(tmp_path, where={"split": "train"})) == ["red apple", "blue whale"]


def test_captions_come_from_parquet_companions_skipping_failed_downloads(tmp_path):
    tars = write_shards(tmp_path)
    # img2dataset's companion lists every input row of the shard, failed downloads included.
    pq.write_table(pa.table({"caption": ["from parquet", "failed", None], "status": ["success", "failed_to_download",
                                                                                    "success"]}),
                   tars[0].with_suffix(".parquet"))
    assert list(captions_from_shards(tmp_path)) == ["from parquet", *CAPTIONS[1]]
