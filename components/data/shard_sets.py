"""Shard sets as training, evaluation and captioning read them: ours (ingest's `_manifest.json` beside them) or
any WebDataset shards made elsewhere, as img2dataset and open_clip's tools write them: `{key}.jpg|png|webp`,
`{key}.txt` (the caption) and optionally `{key}.json` and a `{shard}.parquet` companion.

A shard set is a directory (every `*.tar` in it) or a brace pattern (`dir/{00000..00031}.tar`), local or in an
object store. Its size comes from the first source present: our manifest (a whole directory only), webdataset's
`sizes.json`, the per-shard `{shard}_stats.json` (img2dataset's `successes`, our `kept`), else the tars
themselves (one pass over their headers).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator

from upath import UPath

MANIFEST = "_manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def is_pattern(shards: str | os.PathLike) -> bool:
    return "{" in str(shards)


def shard_files(shards: str | os.PathLike | list[UPath]) -> list[UPath]:
    """The tar files of a shard set, in order; FileNotFoundError in one line when there are none or some of a
    pattern's are missing."""
    if isinstance(shards, list):
        return shards
    if is_pattern(shards):
        from braceexpand import braceexpand

        paths = [UPath(p) for p in braceexpand(str(shards))]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(paths)} shards of {shards} do not exist "
                                    f"(first: {missing[0]})")
        return paths
    path = UPath(shards)
    if path.is_file() and path.suffix == ".tar":
        return [path]
    paths = sorted(path.glob("*.tar"), key=str) if path.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"no WebDataset shards (*.tar) in {shards}: give a shard directory or a brace pattern "
                                "(dir/{00000..00031}.tar), or run pipelines/ingest.py first")
    return paths


def manifest(shards: str | os.PathLike) -> dict | None:
    """Our ingest's (or the CLIP-score filter's) manifest of a whole shard directory; None for shards made
    elsewhere, or a pattern that may name only some of a directory's shards."""
    if is_pattern(shards):
        return None
    path = UPath(shards) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def shard_set_digest(shards: str | os.PathLike) -> str:
    """What a shard set is, as a digest: its manifest's content (ours), else every tar's path, size and
    modification time. FileNotFoundError when the set is gone."""
    from components.cache import file_digest
    from components.data.url_list import fingerprint

    if manifest(shards) is not None:
        return file_digest(UPath(shards) / MANIFEST)
    listing = json.dumps([fingerprint(str(tar)) for tar in shard_files(shards)], sort_keys=True)
    return hashlib.sha1(listing.encode()).hexdigest()


def sample_count(shards: str | os.PathLike) -> tuple[int, str]:
    """(samples in the shard set, where that number comes from)."""
    found = manifest(shards)
    if found is not None:
        return int(found["kept"]), MANIFEST
    files = shard_files(shards)
    sizes = files[0].parent / "sizes.json"
    if sizes.is_file():
        table = json.loads(sizes.read_text())
        if all(f.name in table for f in files):
            return sum(int(table[f.name]) for f in files), "sizes.json"
    stats = [f.with_name(f"{f.stem}_stats.json") for f in files]
    if all(s.is_file() for s in stats):
        counts = [json.loads(s.read_text()) for s in stats]
        if all("successes" in c or "kept" in c for c in counts):
            return sum(int(c["successes"] if "successes" in c else c["kept"]) for c in counts), "*_stats.json"
    return sum(_count_samples(f) for f in files), "the tars"


def _count_samples(tar: UPath) -> int:
    """Samples of one tar with an image."""
    return len({key for key, extension, _ in _members(tar) if extension in IMAGE_EXTENSIONS})


def captions(shards: str | os.PathLike, column: str = "caption", where: dict | None = None) -> Iterator[str]:
    """Every sample's caption, shard by shard: from the Parquet companion when it has the column (a few columns
    read, never images; img2dataset's rows that failed to download are skipped), else from the tar's `.txt`
    members. `where` keeps rows whose companion columns (or JSON fields) equal the given values."""
    import pyarrow.parquet as pq

    where = dict(where or {})
    for tar in shard_files(shards):
        companion = tar.with_suffix(".parquet")
        if companion.is_file():
            with companion.open("rb") as file:
                reader = pq.ParquetFile(file)
                names = set(reader.schema_arrow.names)
                if column in names:
                    status = ["status"] if "status" in names else []
                    for batch in reader.iter_batches(columns=[column, *where, *status], batch_size=8192):
                        rows = batch.to_pydict()
                        statuses = rows.get("status")
                        for i, caption in enumerate(rows[column]):
                            downloaded = statuses is None or statuses[i] in ("ok", "success")
                            if caption and downloaded and all(rows[k][i] == v for k, v in where.items()):
                                yield caption
                    continue
        yield from _tar_captions(tar, where)


def _tar_captions(tar: UPath, where: dict) -> Iterator[str]:
    """The `.txt` of every sample of one tar with an image (and JSON fields matching `where`), in tar order."""
    texts: dict[str, str] = {}
    metas: dict[str, dict] = {}
    images = set()
    for key, extension, read in _members(tar):
        if extension in IMAGE_EXTENSIONS:
            images.add(key)
        elif extension == "txt":
            texts[key] = read().decode("utf-8").strip()
        elif extension == "json":
            metas[key] = json.loads(read())
    for key, text in texts.items():
        if text and key in images and all(metas.get(key, {}).get(k) == v for k, v in where.items()):
            yield text


def _members(tar: UPath) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    """(sample key, extension, read the payload) of each file of a tar, streamed: keys are member names up to
    the first dot of the base name, as webdataset groups them."""
    with tar.open("rb") as file, tarfile.open(fileobj=file, mode="r|") as archive:
        for member in archive:
            if member.isfile():
                directory, _, base = member.name.rpartition("/")
                key, _, extension = base.partition(".")
                yield (f"{directory}/{key}" if directory else key, extension.lower(),
                       lambda member=member: archive.extractfile(member).read())


def tar_samples(tar: UPath) -> Iterator[dict]:
    """The samples of one tar that have an image, in tar order: {"key", "image" (bytes), "txt" (str or None),
    "json" (dict)}. A sample is complete once the next key starts (webdataset writes a sample's files together)."""
    sample: dict = {}
    for key, extension, read in _members(tar):
        if sample and key != sample["key"]:
            if "image" in sample:
                yield {"txt": None, "json": {}, **sample}
            sample = {}
        sample["key"] = key
        if extension in IMAGE_EXTENSIONS:
            sample["image"] = read()
        elif extension == "txt":
            sample["txt"] = read().decode("utf-8").strip()
        elif extension == "json":
            sample["json"] = json.loads(read())
    if "image" in sample:
        yield {"txt": None, "json": {}, **sample}
