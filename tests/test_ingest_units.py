"""Ingest building blocks: URL list formats, filters, image checks, the dedup rule (and one dedup pass on local Ray)."""

from __future__ import annotations

import gzip
import io
import json
import random
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset  # noqa: F401  (pa.dataset)
import pyarrow.parquet as pq
import pytest
from PIL import Image
from upath import UPath

from components.data import images
from components.data import dedup
from components.data.dedup import band_masks, exact_group, find_duplicates, hamming, near_group, read_part_drops
from components.data.filters import build_filters
from components.data.process_part import ImageSettings, PartProcessor, PartSettings, process_part
from components.data.url_list import UrlListError, key_digits, make_key, split_into_parts
from tests.helpers import DEFAULT_FILTERS, PLUGIN_FAILURES, fuzz_bodies, noise_image

ROWS = pd.DataFrame({"link": [f"http://127.0.0.1/{i}.png" for i in range(23)],
                     "text": [f"caption {i}" for i in range(23)],
                     "key": [f"src{i}" for i in range(23)],
                     "score": np.arange(23) / 10})


def write_list(path, fmt: str) -> str:
    if fmt == "parquet":
        ROWS.to_parquet(path, index=False)
    elif fmt in ("csv", "tsv"):
        ROWS.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
    elif fmt == "jsonl":
        ROWS.to_json(path, orient="records", lines=True)
    elif fmt == "csv.gz":
        path.write_bytes(gzip.compress(ROWS.to_csv(index=False).encode()))
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "csv.gz"])
def test_url_list_formats_split_into_keyed_parts(tmp_path, fmt):
    path = write_list(tmp_path / f"list.{fmt}", fmt)
    parts = split_into_parts(path, tmp_path / "parts", shard_size=10, url_col="link", caption_col="text")
    tables = [pq.read_table(p).to_pandas() for p in parts]
    assert [len(t) for t in tables] == [10, 10, 3]
    merged = pd.concat(tables, ignore_index=True)
    assert list(merged["key"][:3]) == ["000000", "000001", "000002"] and merged["key"].iloc[-1] == "000022"
    assert list(merged["url"]) == list(ROWS["link"]) and list(merged["caption"]) == list(ROWS["text"])
    assert list(merged["source_key"]) == list(ROWS["key"])  # the input's own key column is carried, renamed
    assert np.allclose(merged["score"], ROWS["score"])
    # A second call reuses the parts instead of re-keying.
    assert split_into_parts(path, tmp_path / "parts", 10, "link", "text") == parts


def test_url_list_errors_are_one_clear_line(tmp_path):
    path = write_list(tmp_path / "list.parquet", "parquet")
    with pytest.raises(UrlListError, match=r"lacks column\(s\) \['url', 'caption'\]; it has"):
        split_into_parts(path, tmp_path / "a", 10)
    with pytest.raises(UrlListError, match="unknown URL list format"):
        split_into_parts(str(tmp_path / "list.xlsx"), tmp_path / "b", 10)
    split_into_parts(path, tmp_path / "c", 10, "link", "text")
    with pytest.raises(UrlListError, match="different input, shard size or shuffle"):
        split_into_parts(path, tmp_path / "c", 5, "link", "text")


def test_a_shuffled_split_holds_every_row_once_in_a_seeded_order_within_its_window(tmp_path):
    from components.data.url_list import shuffled

    path = write_list(tmp_path / "list.parquet", "parquet")
    parts = split_into_parts(path, tmp_path / "parts", 10, "link", "text", shuffle_window=100, shuffle_seed=3)
    merged = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
    assert [len(pq.read_table(p)) for p in parts] == [10, 10, 3]
    assert list(merged["key"]) == [make_key(i // 10, i % 10, 10) for i in range(23)]  # keys in the new order
    assert sorted(merged["source_key"]) == sorted(ROWS["key"]) and list(merged["source_key"]) != list(ROWS["key"])
    assert dict(zip(merged["source_key"], merged["url"])) == dict(zip(ROWS["key"], ROWS["link"]))  # rows whole
    again = split_into_parts(path, tmp_path / "again", 10, "link", "text", shuffle_window=100, shuffle_seed=3)
    assert [pq.read_table(p).to_pandas().equals(pq.read_table(q).to_pandas()) for p, q in zip(parts, again)] == \
        [True] * 3
    other = split_into_parts(path, tmp_path / "other", 10, "link", "text", shuffle_window=100, shuffle_seed=4)
    assert list(pd.concat([pq.read_table(p).to_pandas() for p in other])["source_key"]) != list(merged["source_key"])
    with pytest.raises(UrlListError, match="different input, shard size or shuffle"):
        split_into_parts(path, tmp_path / "parts", 10, "link", "text")

    # A window shorter than the list: each row leaves at most `window` rows after it arrived, every row once.
    table = pa.table({"i": np.arange(1000)})
    out = np.concatenate([b.column(0).to_numpy() for b in shuffled(iter(table.to_batches(max_chunksize=50)),
                                                                  window=200, seed=0)])
    assert sorted(out) == list(range(1000)) and list(out) != list(range(1000))
    assert all(i < position + 200 + 50 for position, i in enumerate(out))  # never read past the window and a batch


def test_filter_units_and_config():
    filters = build_filters({**DEFAULT_FILTERS, "language": {"enabled": True, "keep": ["en"], "min_score": 0.5}})
    length, words = filters.caption
    assert not length.keep("") and not length.keep(None) and length.keep("a dog")
    assert words.keep("one two") and not words.keep("   ")
    assert filters.language.keep(*filters.language.identify("a photograph of a dog running on the beach"))
    assert not filters.language.keep(*filters.language.identify("ein Hund läuft über den Strand und bellt laut"))
    pixels, side, ratio = filters.header
    assert not pixels.keep(images.Header("PNG", 20_000, 20_000)) and pixels.keep(images.Header("PNG", 512, 512))
    assert not side.keep(images.Header("PNG", 16, 400)) and not ratio.keep(images.Header("PNG", 400, 100))
    assert build_filters({name: {**cfg, "enabled": False} for name, cfg in DEFAULT_FILTERS.items()}).reasons() == [
        "invalid_url", "unsupported_scheme", "blocked_address", "dns_error", "connection_error", "timeout",
        "http_error", "too_large", "too_many_redirects", "opted_out", "file_missing", "read_error", "not_an_image",
        "truncated_image",
        "decode_error"]
    with pytest.raises(ValueError, match="unknown filter"):
        build_filters({"blur": {"enabled": True}})
    with pytest.raises(ValueError, match="module:function"):
        build_filters({"model_score": {"enabled": True, "scorer": None}})


def encoded(fmt: str, size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncation_is_detected_for_each_format(fmt):
    data = encoded(fmt)
    header = images.read_header(data)
    assert header == images.Header(fmt, 40, 30)
    assert not images.is_truncated(data, header)
    assert images.is_truncated(data[: len(data) * 2 // 3], header)


def test_html_is_not_an_image():
    assert images.read_header(b"<html><body>hello</body></html>") is None


def brute_force_near(keys, hashes, max_distance):
    dropped = {}
    for i in range(len(keys)):
        for j in range(len(keys)):
            if keys[j] < keys[i] and bin((int(hashes[i]) ^ int(hashes[j])) & (2**64 - 1)).count("1") <= max_distance:
                dropped[keys[i]] = True
    return set(dropped)


@pytest.mark.parametrize("max_distance", [0, 2, 4])
def test_near_dedup_matches_brute_force_through_bands(max_distance):
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=300, dtype=np.int64)
    for i in range(0, 300, 3):  # plant near copies at every distance up to max_distance + 1
        bits = rng.choice(64, size=rng.integers(0, max_distance + 2), replace=False)
        hashes[i + 1] = hashes[i] ^ np.int64(sum(1 << int(b) for b in bits) - (1 << 64) * (63 in bits))
    keys = np.array([f"{i:09d}" for i in rng.permutation(300)])
    frame = pd.DataFrame({"key": keys, "part": "00000", "phash": hashes})
    # The distributed pass sees the rows grouped by band value; its union must equal the pairwise rule.
    found = set()
    for band, (shift, mask) in enumerate(band_masks(max_distance)):
        values = (hashes.view(np.uint64) >> np.uint64(shift)) & np.uint64(mask)
        for value in np.unique(values):
            found |= set(near_group(frame[values == value], max_distance, block_rows=7)["key"])
    expected = brute_force_near(list(keys), list(hashes), max_distance)
    assert found == expected and len(expected) > 20


def test_exact_group_keeps_smallest_key():
    group = pd.DataFrame({"key": ["000007", "000002", "000005"], "part": "00000", "sha256": "ab"})
    out = exact_group(group)
    assert sorted(out["key"]) == ["000005", "000007"] and set(out["duplicate_of"]) == {"000002"}


def planted_staging(rng, parts: int, rows: int, max_distance: int, first_part: int = 0) -> pd.DataFrame:
    """Staging rows of parts first_part.. with planted exact copies, near copies, twins through several bands,
    identical-hash crowds and one band value shared by more than CROWDED_CLASSES distinct hashes."""
    n = parts * rows
    u64 = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    sha = np.array([f"{v:016x}" for v in rng.integers(0, 2**62, n)], dtype=object)
    low = np.uint64((1 << band_masks(max_distance)[1][0]) - 1)  # the bits of band 0
    crowd = rng.permutation(n)[: dedup.CROWDED_CLASSES + 200]  # same band 0 value, distinct hashes
    u64[crowd] = (u64[crowd] & ~low) | (u64[crowd[0]] & low)
    def flip(v, count):
        for bit in rng.choice(64, count, replace=False):
            v ^= np.uint64(1) << np.uint64(bit)
        return v
    for i in crowd[1:400:4]:  # near copies inside the crowded band value (flips outside band 0)
        j = rng.integers(n)
        u64[j] = flip(u64[i] & ~low, rng.integers(1, max_distance + 1)) & ~low | (u64[i] & low)
    originals = rng.choice(n, 300, replace=False)
    for i in originals[:100]:  # exact copies (same bytes: same pHash), some of them with smaller keys
        for j in rng.choice(n, rng.integers(1, 4)):
            sha[j], u64[j] = sha[i], u64[i]
    for i in originals[100:130]:  # same bytes, pHash recomputed differently: exact twins that are not near
        j = rng.integers(n)
        sha[j] = sha[i]
    for i in originals[130:250]:  # near copies at distance 1..d+1 (d+1: not a twin)
        for j in rng.choice(n, rng.integers(1, 4)):
            u64[j] = flip(u64[i].copy(), rng.integers(1, max_distance + 2))
    for i in originals[250:270]:  # ties: one row with several candidate twins, in different bands
        for j in rng.choice(n, 3):
            u64[j] = flip(u64[i].copy(), max_distance)
    u64[originals[270:300]] = u64[originals[270]]  # a crowd of identical hashes
    status = np.where(rng.random(n) < 0.05, "too_small", "ok")
    keys = [make_key(first_part + i // rows, i % rows, rows) for i in range(n)]
    return pd.DataFrame({"key": keys, "status": status, "sha256": sha, "phash": u64.view(np.int64)})


def brute_force_drops(frame: pd.DataFrame, max_distance: int) -> dict[str, tuple[str, str]]:
    ok = frame[frame["status"] == "ok"].sort_values("key")
    keys, sha, hashes = ok["key"].to_numpy(), ok["sha256"].to_numpy(), ok["phash"].to_numpy()
    expected = {}
    for i in range(1, len(keys)):
        exact = np.flatnonzero(sha[:i] == sha[i])
        near = np.flatnonzero(hamming(hashes[:i], hashes[i]) <= max_distance)
        if len(exact):
            expected[keys[i]] = ("duplicate_exact", keys[exact[0]])
        elif len(near):
            expected[keys[i]] = ("duplicate_near", keys[near[0]])
    return expected


@pytest.mark.parametrize("first_part", [0, 123_455])  # from part 100,000 on a key's part has six digits
def test_find_duplicates_matches_brute_force(ray_session, tmp_path, first_part):
    max_distance, parts, rows = 2, 4, 2000
    frame = planted_staging(np.random.default_rng(7), parts, rows, max_distance, first_part)
    names = [f"{part:05d}" for part in range(first_part, first_part + parts)]  # as split_into_parts names them
    files = []
    for i, name in enumerate(names):  # staging files carry more columns than the pass reads
        chunk = frame.iloc[i * rows:(i + 1) * rows].assign(image=b"x")
        files.append(tmp_path / f"part-{name}.parquet")
        pq.write_table(pa.Table.from_pandas(chunk, preserve_index=False), files[-1])
    find_duplicates(files, tmp_path / "drops", exact=True, near_distance=max_distance,
                    index_digits=key_digits(rows), num_partitions=3)

    expected = brute_force_drops(frame, max_distance)
    found = {}
    for name in names:
        found.update(read_part_drops(tmp_path / "drops", name))
    reasons = pd.Series([reason for reason, _ in expected.values()]).value_counts()
    assert reasons["duplicate_exact"] > 200 and reasons["duplicate_near"] > 200
    assert found == expected
    # Every row of the drop list (a key may have one per bucket) names a valid twin with a smaller key.
    by_part = pa.dataset.partitioning(pa.schema([("part", pa.string())]), flavor="hive")
    drops = pq.read_table(tmp_path / "drops", partitioning=by_part).to_pandas()
    assert set(drops.columns) == {"key", "part", "reason", "duplicate_of"}
    assert set(drops["part"]) <= set(names) and (drops["part"] == drops["key"].str.slice(0, -4)).all()
    row = frame.set_index("key")
    twin, own = row.loc[drops["duplicate_of"]], row.loc[drops["key"]]
    exact = drops["reason"].to_numpy() == "duplicate_exact"
    assert (drops["duplicate_of"] < drops["key"]).all()
    assert (twin["sha256"].to_numpy()[exact] == own["sha256"].to_numpy()[exact]).all()
    assert (hamming(twin["phash"].to_numpy()[~exact], own["phash"].to_numpy()[~exact]) <= max_distance).all()


def test_bucket_kernel_paths_match_brute_force():
    """The in-bucket kernel alone, with the crowded and pair paths forced, agrees with the brute force."""
    frame = planted_staging(np.random.default_rng(3), 1, 3000, 2)
    expected = brute_force_drops(frame, 2)
    records = dedup._records(pa.Table.from_pandas(frame, preserve_index=False), True, 2, 1)
    for crowded in (0, 10**6):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dedup, "CROWDED_CLASSES", crowded)
            patch.setattr(dedup, "PAIRS_PER_STEP", 64)
            patch.setattr(dedup, "BLOCK_CELLS", 5000)
            drops = dedup._bucket_drops(records, 2, key_digits(3000)).to_pandas()
        drops = drops.sort_values(["reason", "duplicate_of"]).drop_duplicates("key")
        assert dict(zip(drops["key"], zip(drops["reason"], drops["duplicate_of"]))) == expected


def test_hamming_counts_bits_of_signed_hashes():
    assert hamming(np.array([-1]), np.array([0]))[0] == 64
    assert hamming(np.array([0b1011]), np.array([0b0001]))[0] == 2


def test_bands_cover_64_bits():
    for d in range(8):
        masks = band_masks(d)
        assert len(masks) == d + 1
        assert sum(bin(mask).count("1") for _, mask in masks) == 64
        assert json.dumps(masks)  # plain ints, picklable into Ray tasks


def test_the_corpus_build_directory_refuses_object_store_urls_in_one_line():
    from components.runtime import path

    assert path("data/shards").is_absolute()
    with pytest.raises(ValueError, match="corpus_dir .*takes a filesystem path"):
        path("s3://bucket/shards")


# Every reason the image checks can give a row (the part's filters: tests/helpers.DEFAULT_FILTERS).
IMAGE_REASONS = {"ok", "not_an_image", "truncated_image", "decode_error", "max_pixels", "min_side", "max_aspect_ratio"}


def processed_part(tmp_path, bodies: list[bytes], image: ImageSettings = ImageSettings(image_size=32)) -> pd.DataFrame:
    """`bodies` as one input part (local image bytes, as the built-in corpus gives them) through stage 1 of ingest;
    returns its staging rows."""
    tmp_path.mkdir(exist_ok=True)
    part, staging = tmp_path / "part-00000.parquet", tmp_path / "staging.parquet"
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(len(bodies))], "url": ["local"] * len(bodies),
                             "caption": ["an image"] * len(bodies), "image": bodies}), part)
    worker = PartProcessor(PartSettings(image=image, filters=DEFAULT_FILTERS))
    summary = process_part(UPath(part), UPath(staging), worker)
    rows = pq.read_table(staging).to_pandas()
    assert summary["rows"] == len(rows) == len(bodies) and summary["ok"] == (rows["status"] == "ok").sum()
    return rows


def test_files_that_make_pillow_plugins_raise_lose_their_row_and_nothing_else(tmp_path):
    """A crawl meets files that make Pillow's rarely used plugins raise what no caller expects. Such a file costs
    its own row: Pillow tries only the accepted formats (it is not_an_image), and where a user accepts the plugin's
    format the exception becomes the row's decode_error, named by type; the part is written either way."""
    for body, error in PLUGIN_FAILURES.values():
        with pytest.raises(error):
            Image.open(io.BytesIO(body))  # every plugin tried, as before: these files are real failures
    good = [noise_image("PNG", seed) for seed in range(2)]
    bodies = [*good, *(body for body, _ in PLUGIN_FAILURES.values())]

    rows = processed_part(tmp_path / "default", bodies)
    assert rows["status"].tolist() == ["ok", "ok", "not_an_image", "not_an_image"]
    assert "accepted formats (JPEG, PNG" in rows["error_message"][2]

    accepting = ImageSettings(image_size=32, formats=(*images.ACCEPTED_FORMATS, *PLUGIN_FAILURES))
    rows = processed_part(tmp_path / "accepting", bodies, accepting)
    assert rows["status"].tolist() == ["ok", "ok", "decode_error", "decode_error"]
    assert rows["error_message"][2].startswith("NotImplementedError: Unimplemented pixel format")
    assert rows["error_message"][3].startswith("AttributeError:")
    assert rows["image"][2:].isna().all() and rows["sha256"][2:].isna().all()


def test_a_fuzz_pass_over_every_accepted_format_accounts_for_every_row(tmp_path):
    """Seeded mutations (bytes flipped, cut out, inserted) of an image in each accepted format and of the two plugin
    failures, 1,600 files in one part: every file leaves as one row with a reason, the part is written, and the
    decoders were reached (some mutations still decode, some fail at the header, some in the decoder)."""
    rows = processed_part(tmp_path, fuzz_bodies(random.Random(0), 200))  # benchmarks/fuzz_images.py: for minutes
    counts = rows["status"].value_counts().to_dict()
    assert set(counts) <= IMAGE_REASONS, counts
    assert {"ok", "not_an_image", "truncated_image", "decode_error"} <= set(counts), counts


@pytest.mark.parametrize("override, message", [
    ("ingest.shard_size=0", "ingest.shard_size must be >= 1, got 0"),  # looped forever writing empty parts
    ("ingest.shard_size=-1", "ingest.shard_size must be >= 1, got -1"),  # an IndexError traceback
    ("ingest.workers=0", "ingest.workers must be >= 1 or null, got 0"),
    ("ingest.shuffle_window=-5", "ingest.shuffle_window must be >= 0 (0: no shuffle), got -5"),
    ("ingest.image_size=0", "ingest.image_size must be >= 1, got 0"),
    ("ingest.resize_mode=stretch", "ingest.resize_mode must be one of border, keep_ratio"),
    ("ingest.encode_quality=101", "ingest.encode_quality must be in [0, 100] for jpg, got 101"),
    ("ingest.image_formats=[JPEG,JPG]", "ingest.image_formats must name Pillow formats"),
    ("ingest.download.timeout=0", "ingest.download.timeout must be > 0, got 0"),
    ("ingest.download.thread_count=0", "ingest.download.thread_count must be >= 1, got 0"),
])  # types (ingest.append=maybe) fail at parse: tests/test_trainer_settings.py
def test_an_ingest_setting_out_of_range_is_refused_by_name_before_anything_starts(tmp_path, override, message):
    from tests.helpers import run_stage

    ROWS.to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_stage("ingest", "data=url_list", f"data.url_list={tmp_path / 'pairs.csv'}", "data.url_col=link",
                  "data.caption_col=text", f"data.output_dir={tmp_path / 'out'}", "progress=false", override,
                  cwd=tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()  # no run began, no Ray


def test_input_columns_named_like_ours_are_carried_as_source_columns(tmp_path):
    """DataComp-style lists carry columns that ingest writes itself (status, width, sha256, original_width, key)
    and sometimes an `image` column of paths: each is carried as source_<name>, never overwritten, and a string
    `image` is never read as image bytes."""
    theirs = {"key": ["a", "b"], "image": ["s3://pool/a.jpg", "s3://pool/b.jpg"], "status": ["success", "failed"],
              "width": [640, 480], "sha256": ["00ff", "ff00"], "original_width": [1280, 960]}
    # Loopback URLs that the default rules refuse: the rows end as blocked_address, nothing is fetched.
    pd.DataFrame({"url": ["http://127.0.0.1/a.png", "http://127.0.0.1/b.png"], "caption": ["a", "b"],
                  **theirs}).to_parquet(tmp_path / "list.parquet")
    (part,) = split_into_parts(str(tmp_path / "list.parquet"), tmp_path / "parts", 10)
    worker = PartProcessor(PartSettings(filters=DEFAULT_FILTERS))
    process_part(UPath(part), UPath(tmp_path / "staging.parquet"), worker)
    rows = pq.read_table(tmp_path / "staging.parquet").to_pandas()
    assert rows["key"].tolist() == ["000000", "000001"] and rows["status"].tolist() == ["blocked_address"] * 2
    for name, values in theirs.items():
        assert rows[f"source_{name}"].tolist() == values


def test_an_ingest_into_an_output_another_run_holds_is_refused_in_one_line(tmp_path):
    from components import lease
    from components.data.ingest import IngestError, IngestJob, run_ingest

    ROWS.to_csv(tmp_path / "pairs.csv", index=False)
    job = IngestJob(url_list=str(tmp_path / "pairs.csv"), output_dir=UPath(tmp_path / "out"),
                    part_settings=PartSettings(filters=DEFAULT_FILTERS), url_col="link", caption_col="text")
    with lease.held(tmp_path / "out", "ingest"):
        with pytest.raises(IngestError, match="out is in use by another ingest"):
            run_ingest(job, progress=False)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [lease.LEASE]  # nothing else was written


def test_a_part_streams_its_downloads_a_bounded_window_ahead_in_input_order(tmp_path, monkeypatch):
    """While the part's first image hangs, the worker downloads at most AHEAD_ROWS rows past it, never the whole
    part (which held every body of the part in memory); the staging file keeps the input's order, one row group
    per GROUP_ROWS rows."""
    import threading

    from components.data import process_part as stage
    from components.data.download import DownloadConfig
    from components.data.loopback_server import LoopbackServer, send_bytes

    monkeypatch.setattr(stage, "GROUP_ROWS", 4)
    monkeypatch.setattr(stage, "AHEAD_ROWS", 16)
    png = noise_image("PNG", 0)
    release, seen_while_first_hung = threading.Event(), []

    def first(handler):  # answers once the worker has had time to run as far ahead as it will
        release.wait(timeout=3)
        seen_while_first_hung.append(len(server.requests) - 1)
        send_bytes(handler, png, "image/png")

    rows = 64
    with LoopbackServer(tmp_path, routes={"/img0.png": first}) as server:
        for i in range(1, rows):
            (tmp_path / f"img{i}.png").write_bytes(png)
        threading.Timer(1.5, release.set).start()
        part = tmp_path / "part.parquet"
        pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(rows)],
                                 "caption": [f"picture {i}" for i in range(rows)],
                                 "url": [f"{server.base_url}/img{i}.png" for i in range(rows)]}), part)
        worker = PartProcessor(PartSettings(image=ImageSettings(image_size=16), filters={},
                                            download=DownloadConfig(allow_networks=("127.0.0.1/32",), thread_count=4)))
        result = process_part(UPath(part), UPath(tmp_path / "staging.parquet"), worker)
    assert result["rows"] == result["ok"] == rows
    assert stage.GROUP_ROWS < seen_while_first_hung[0] <= stage.AHEAD_ROWS, seen_while_first_hung
    staging = pq.ParquetFile(tmp_path / "staging.parquet")
    assert staging.num_row_groups == rows // stage.GROUP_ROWS
    assert staging.read().column("key").to_pylist() == [f"{i:09d}" for i in range(rows)]


def test_a_shard_tar_is_reproducible_and_reads_back_through_webdataset(tmp_path):
    """The same rows give byte-identical tars (fixed mtime), whose samples webdataset reads back whole:
    image, caption, and the metadata as JSON with non-ASCII text kept."""
    import webdataset as wds

    from components.data.shards import _write_tar

    rows = pa.Table.from_pylist([{"key": f"00000{i}", "image": noise_image("JPEG", i), "caption": caption,
                                  "part": 0, "caption_ja": "笑顔", "width": 48}
                                 for i, caption in enumerate(["grinning face", None])])
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    _write_tar(rows, UPath(first), "jpg")
    _write_tar(rows, UPath(second), "jpg")
    assert first.read_bytes() == second.read_bytes()

    samples = list(wds.WebDataset(str(first), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000", "000001"]
    assert [s["txt"] for s in samples] == [b"grinning face", b""]
    assert samples[0]["jpg"] == rows["image"][0].as_py()
    assert json.loads(samples[1]["json"]) == {"key": "000001", "caption": None, "caption_ja": "笑顔", "width": 48}
    assert "笑顔".encode() in samples[1]["json"]


def test_a_folder_a_glob_or_several_files_are_one_list_in_order(tmp_path, monkeypatch):
    """LAION's metadata comes as many Parquet files: a folder, a glob or a list of entries is one URL list, its
    files' rows in name order, whatever their formats; JSONL is streamed block by block like CSV."""
    from components.data import url_list

    folder = tmp_path / "lists"
    (folder / "more").mkdir(parents=True)
    ROWS.iloc[:8].to_parquet(folder / "a.parquet", index=False)
    (folder / "b.csv.gz").write_bytes(gzip.compress(ROWS.iloc[8:15].to_csv(index=False).encode()))
    ROWS.iloc[15:].to_json(folder / "more" / "c.jsonl", orient="records", lines=True)
    (folder / "README.md").write_text("not a list")
    monkeypatch.setattr(url_list, "READ_BLOCK_BYTES", 256)
    assert len(list(url_list.iter_batches(str(folder / "more" / "c.jsonl")))) > 1
    for number, source in enumerate([str(folder), f"{folder}/**", [f"{folder}/*.*", str(folder / "more" / "c.jsonl")]]):
        parts = split_into_parts(source, tmp_path / f"parts{number}", 10, "link", "text")
        merged = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
        assert list(merged["url"]) == list(ROWS["link"]) and np.allclose(merged["score"], ROWS["score"]), source
    with pytest.raises(UrlListError, match="no URL list files .* in .*xlsx"):
        split_into_parts(f"{folder}/*.xlsx", tmp_path / "none", 10, "link", "text")
    with pytest.raises(UrlListError, match="URL list .*gone.parquet does not exist"):
        split_into_parts([str(folder), str(tmp_path / "gone.parquet")], tmp_path / "gone", 10, "link", "text")
