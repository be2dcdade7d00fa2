"""Ingest end to end on a real local Ray cluster against a real HTTP server on 127.0.0.1, with faults."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import zlib
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data.download import DownloadConfig
from components.data.emoji_corpus import load_corpus
from components.data.ingest import IngestError, IngestJob, run_ingest
from components.data.loopback_server import LoopbackServer, redirect_to, send_bytes
from components.data.process_part import ImageSettings, PartSettings
from tests.conftest import CORPUS_LIMIT
from tests.helpers import DEFAULT_FILTERS, PLUGIN_FAILURES, read_shards

pytestmark = pytest.mark.slow


def png_bomb(side: int = 20_000) -> bytes:
    """A valid side x side greyscale PNG that compresses to a few hundred KB (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def jpeg_of(png: bytes, quality: int = 92) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def faults(small_corpus):
    """Corpus server on 127.0.0.1 with fault routes, plus a server on 127.0.0.2 that must never be asked."""
    corpus = load_corpus(small_corpus)
    original = (small_corpus / corpus.iloc[0]["image_path"]).read_bytes()
    jpeg = jpeg_of(original)
    bomb = png_bomb()

    def slow(handler):
        time.sleep(2.0)
        send_bytes(handler, original, "image/png")

    def opted_out_copy(handler):  # a valid image whose site opts it out of AI training
        handler.send_response(200)
        handler.send_header("X-Robots-Tag", "noai")
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(len(original)))
        handler.end_headers()
        handler.wfile.write(original)

    with LoopbackServer(host="127.0.0.2") as outside:
        routes = {
            "/missing.png": lambda h: send_bytes(h, b"no", "text/plain", 404),
            "/broken.png": lambda h: send_bytes(h, b"oops", "text/plain", 500),
            "/slow.png": slow,
            "/truncated.jpg": lambda h: send_bytes(h, jpeg[: len(jpeg) // 2], "image/jpeg"),
            "/page.html": lambda h: send_bytes(h, b"<html><body>not an image</body></html>", "text/html"),
            "/bomb.png": lambda h: send_bytes(h, bomb, "image/png"),
            "/copy-a.png": lambda h: send_bytes(h, original, "image/png"),
            "/copy-b.png": lambda h: send_bytes(h, original, "image/png"),
            "/reencoded.jpg": lambda h: send_bytes(h, jpeg, "image/jpeg"),
            "/redirect-out": redirect_to(f"{outside.base_url}/secret.png"),
            "/texture.dds": lambda h: send_bytes(h, PLUGIN_FAILURES["DDS"][0], "image/vnd-ms.dds"),
            "/scan.spi": lambda h: send_bytes(h, PLUGIN_FAILURES["SPIDER"][0], "application/octet-stream"),
            "/opted-out.png": opted_out_copy,
        }
        with LoopbackServer(small_corpus, routes=routes) as server:
            yield server, outside, corpus


def fault_rows(base: str, outside: str) -> list[tuple[str, str, str]]:
    """(url, caption, expected drop reason) — rows after the clean corpus rows, so the originals keep the smaller keys."""
    return [
        (f"{base}/missing.png", "a 404", "http_error"),
        (f"{base}/broken.png", "a 500", "http_error"),
        (f"{base}/slow.png", "too slow", "timeout"),
        (f"{base}/truncated.jpg", "half a jpeg", "truncated_image"),
        (f"{base}/page.html", "html page", "not_an_image"),
        (f"{base}/bomb.png", "png bomb", "max_pixels"),
        (f"{base}/copy-a.png", "same bytes again", "duplicate_exact"),
        (f"{base}/copy-b.png", "same bytes once more", "duplicate_exact"),
        (f"{base}/reencoded.jpg", "re-encoded copy", "duplicate_near"),
        (f"{base}/copy-a.png", "", "caption_length"),
        ("file:///etc/passwd", "local file", "unsupported_scheme"),
        ("ftp://127.0.0.1/image.png", "ftp", "unsupported_scheme"),
        ("not a url at all", "garbage", "invalid_url"),
        (f"{outside}/image.png", "other loopback address", "blocked_address"),
        (f"{base}/redirect-out", "redirect to 127.0.0.2", "blocked_address"),
        # Files that make Pillow's DDS and SPIDER plugins raise (no accepted format: those plugins never run).
        (f"{base}/texture.dds", "a DDS texture", "not_an_image"),
        (f"{base}/scan.spi", "a SPIDER scan", "not_an_image"),
        (f"{base}/opted-out.png", "a site's image under X-Robots-Tag: noai", "opted_out"),
    ]


def make_job(url_list: Path, output_dir: Path, shard_size: int = 32, **filters) -> IngestJob:
    settings = PartSettings(
        image=ImageSettings(image_size=48, resize_mode="border", encode_format="jpg", encode_quality=90),
        download=DownloadConfig(timeout=1.0, retries=1, thread_count=8, allow_networks=("127.0.0.1/32",)),
        filters={**DEFAULT_FILTERS, **filters},
    )
    return IngestJob(url_list=str(url_list), output_dir=output_dir, part_settings=settings, shard_size=shard_size,
                     workers=2, dataset_name="faults")


def test_ingest_with_faults_accounts_for_every_row(ray_session, faults, tmp_path):
    server, outside, corpus = faults
    rows = [(f"{server.base_url}/{p}", c, "kept") for p, c in zip(corpus["image_path"], corpus["caption"])]
    rows += fault_rows(server.base_url, outside.base_url)
    url_list = tmp_path / "urls.csv"
    pd.DataFrame({"url": [r[0] for r in rows], "caption": [r[1] for r in rows],
                  "expected": [r[2] for r in rows]}).to_csv(url_list, index=False)

    manifest = run_ingest(make_job(url_list, tmp_path / "shards"), progress=False)

    expected = pd.Series([r[2] for r in rows]).value_counts().to_dict()
    reference = brute_force_dedup(tmp_path / "shards")  # the corpus has near-identical drawings of its own
    expected["kept"] -= len(reference)
    for reason in ("duplicate_exact", "duplicate_near"):
        expected[reason] = expected.get(reason, 0) + sum(1 for r in reference.values() if r == reason)
    assert manifest["kept"] == expected.pop("kept")
    assert {r: n for r, n in manifest["dropped"].items() if n} == expected
    assert manifest["kept"] + manifest["dropped_total"] == manifest["input_rows"] == len(rows)
    assert outside.requests == []  # 127.0.0.2 was never contacted, directly or through the redirect
    assert server.requests.count("/broken.png") == 2  # a 500 is retried once
    assert server.requests.count("/missing.png") == 1  # a 404 is not

    # Each dropped row is kept on disk with its reason; each kept row is in exactly one shard.
    dropped = read_dropped(tmp_path / "shards")
    faulty = dropped[dropped["expected"] != "kept"]
    assert (faulty["status"] == faulty["expected"]).all() and len(faulty) == len(fault_rows("", ""))
    assert dict(zip(dropped["key"], dropped["status"])) == {**reference, **dict(zip(faulty["key"], faulty["status"]))}
    samples = read_shards(tmp_path / "shards")
    assert len(samples) == manifest["kept"] and len({s["key"] for s in samples}) == len(samples)
    assert all(s["json"]["expected"] == "kept" for s in samples)

    # A rerun whose download settings would keep other rows is refused (it would mix two datasets); a killed
    # write's temporary is cleaned up, a live process's is not.
    slower = make_job(url_list, tmp_path / "shards")
    slower = dataclasses.replace(slower, part_settings=dataclasses.replace(
        slower.part_settings, download=dataclasses.replace(slower.part_settings.download, timeout=5.0)))
    stale = tmp_path / "shards" / "_work" / ".settings.json.999999999.tmp"
    live = tmp_path / "shards" / f".sizes.json.{os.getpid()}.tmp"
    stale.write_text("half")
    live.write_text("half")
    with pytest.raises(IngestError, match="holds an ingest with other download settings"):
        run_ingest(slower, progress=False)
    assert not stale.exists() and live.exists()

    # A shard that lost a row and its count alike (its own stats still add up) fails the total against the list.
    stats = tmp_path / "shards" / "00000_stats.json"
    lost = json.loads(stats.read_text())
    lost["input"], lost["kept"] = lost["input"] - 1, lost["kept"] - 1
    stats.write_text(json.dumps(lost))
    with pytest.raises(IngestError, match=f"shards account for {len(rows) - 1} input rows, the URL list had {len(rows)}"):
        run_ingest(make_job(url_list, tmp_path / "shards"), progress=False)


def read_dropped(shard_dir: Path) -> pd.DataFrame:
    # Nullable dtypes: a 64-bit pHash must not pass through float.
    return pd.concat([pd.read_parquet(f, dtype_backend="numpy_nullable")
                      for f in sorted((shard_dir / "_dropped").glob("*.parquet"))])


def brute_force_dedup(shard_dir: Path, max_distance: int = 2) -> dict[str, str]:
    """The dedup rule applied pairwise to every image that reached dedup: key -> reason of the corpus rows it drops."""
    kept = pd.concat([pd.read_parquet(f, dtype_backend="numpy_nullable") for f in sorted(shard_dir.glob("*.parquet"))])
    dropped = read_dropped(shard_dir)
    candidates = pd.concat([kept, dropped[dropped["status"].str.startswith("duplicate")]])
    candidates = candidates[candidates["expected"] == "kept"].sort_values("key")
    reasons = {}
    rows = list(candidates[["key", "sha256", "phash"]].itertuples(index=False))
    for i, (key, sha, phash) in enumerate(rows):
        earlier = rows[:i]
        if any(other.sha256 == sha for other in earlier):
            reasons[key] = "duplicate_exact"
        elif any(bin((int(other.phash) ^ int(phash)) & (2**64 - 1)).count("1") <= max_distance for other in earlier):
            reasons[key] = "duplicate_near"
    return reasons


def test_bomb_is_refused_from_its_header(faults):
    """Only the header is read: the 400-megapixel image is never decoded (that would take > 1 GB)."""
    import resource

    from components.data import images

    body = png_bomb()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    header = images.read_header(body)
    assert (header.width, header.height) == (20_000, 20_000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_model_score_hook_drops_low_scores(ray_session, small_corpus, tmp_path):
    from components.data.emoji_corpus import write_local_list

    url_list = write_local_list(small_corpus, tmp_path / "local.parquet")
    model_score = {"enabled": True, "scorer": "tests.helpers:caption_length_score", "threshold": 12}
    manifest = run_ingest(make_job(url_list, tmp_path / "shards", model_score=model_score,
                                   exact_dedup={"enabled": False}, near_dedup={"enabled": False}), progress=False)
    corpus = load_corpus(small_corpus)
    short = int((corpus["caption"].str.len() < 12).sum())
    assert 0 < short < len(corpus)
    assert manifest["dropped"]["model_score"] == short
    assert manifest["kept"] == len(corpus) - short
    scores = pd.concat([pq.read_table(f).to_pandas() for f in (tmp_path / "shards").glob("*.parquet")])["model_score"]
    assert (scores >= 12).all()


def test_failed_rows_are_retried_and_a_list_is_appended_with_every_row_accounted_for(ray_session, small_corpus,
                                                                                      tmp_path):
    """ingest.retry downloads again only the rows last dropped for a transient reason (503, 429, a timeout; not a
    404), once the server mends; ingest.append adds another list. Both land in new shards of the same dataset, are
    deduplicated against the rows already there (which win), and the manifest's identity holds over every round:
    rows listed = kept + dropped, a retried row counted by its latest outcome."""
    from components.data.ingest import latest_drops
    from components.data.shard_sets import MANIFEST, captions, sample_count

    corpus = load_corpus(small_corpus)
    image = {i: (small_corpus / corpus.iloc[i]["image_path"]).read_bytes() for i in range(len(corpus))}
    mended = False

    def flaky(body: bytes, failure) -> callable:
        def route(handler):
            if mended:
                send_bytes(handler, body, "image/png")
            else:
                failure(handler)
        return route

    def too_slow(handler):
        time.sleep(2.0)  # past the 1 s timeout, twice (one retry within the run)
        send_bytes(handler, image[42], "image/png")

    routes = {"/busy.png": flaky(image[40], lambda h: send_bytes(h, b"busy", "text/plain", 503)),
              "/limited.png": flaky(image[41], lambda h: send_bytes(h, b"slow down", "text/plain", 429)),
              "/stalled.png": flaky(image[42], too_slow),
              "/copy-of-first.png": flaky(image[0], lambda h: send_bytes(h, b"busy", "text/plain", 502)),
              "/missing.png": lambda h: send_bytes(h, b"no", "text/plain", 404)}
    with LoopbackServer(small_corpus, routes=routes) as server:
        base = server.base_url
        first = pd.DataFrame({"url": [f"{base}/{p}" for p in corpus["image_path"][:30]]
                              + [f"{base}/{name}" for name in routes],
                              "caption": list(corpus["caption"][:30]) + ["busy", "limited", "stalled", "copy", "gone"]})
        first.to_csv(tmp_path / "first.csv", index=False)
        output = tmp_path / "shards"
        job = make_job(tmp_path / "first.csv", output, shard_size=16)
        before = run_ingest(job, progress=False)
        assert before["dropped"]["http_error"] == 4 and before["dropped"]["timeout"] == 1
        assert before["kept"] + before["dropped_total"] == before["input_rows"] == 35

        mended = True
        retried = run_ingest(dataclasses.replace(job, retry=True), progress=False)
        # The 503, 429 and the timeout come back kept; the 502 brings a copy of a kept image: its duplicate now.
        assert retried["input_rows"] == 35 and retried["kept"] == before["kept"] + 3
        assert retried["dropped"]["http_error"] == 1 and retried["dropped"]["timeout"] == 0
        assert retried["dropped"]["duplicate_exact"] == before["dropped"]["duplicate_exact"] + 1
        assert retried["kept"] + retried["dropped_total"] == 35
        assert [r["kind"] for r in retried["rounds"]] == ["list", "retry"]
        assert retried["rounds"][1]["retried"] == {"http_error": 3, "timeout": 1}
        assert server.requests.count("/missing.png") == 1  # a 404 is not retried, by the downloader or the round
        samples = {s["key"]: s for s in read_shards(output)}
        first_keys = {row["json"]["url"]: key for key, row in samples.items() if "retry_of" not in row["json"]}
        again = [s for s in samples.values() if "retry_of" in s["json"]]
        assert sorted(s["txt"] for s in again) == ["busy", "limited", "stalled"]
        assert all(s["key"][:5] == "00003" and s["json"]["retry_of"][:5] in ("00001", "00002") for s in again)
        final = latest_drops(output).to_pandas()
        assert len(final) == retried["dropped_total"]
        copy = final[final["caption"] == "copy"].iloc[0]
        original = first_keys[f"{base}/{corpus.iloc[0]['image_path']}"]
        assert (copy["status"], copy["duplicate_of"]) == ("duplicate_exact", original)
        assert final[final["caption"] == "gone"]["status"].tolist() == ["http_error"]

        # Nothing left to retry: the same dataset.
        assert run_ingest(dataclasses.replace(job, retry=True), progress=False)["rounds"] == retried["rounds"]

        # Another list: refused without append; appended, its copies of rows already there are their duplicates.
        copied = next(f"{base}/{p}" for p in corpus["image_path"][1:30] if f"{base}/{p}" in first_keys)  # a kept row
        second = pd.DataFrame({"url": [f"{base}/{p}" for p in corpus["image_path"][30:40]] + [copied],
                               "caption": list(corpus["caption"][30:40]) + ["again"]})
        second.to_csv(tmp_path / "second.csv", index=False)
        shards_before = {p.name: p.read_bytes() for p in output.glob("*.tar")}
        appended_job = make_job(tmp_path / "second.csv", output, shard_size=16)
        with pytest.raises(IngestError, match="holds an ingest of another list .* ingest.append=true adds"):
            run_ingest(appended_job, progress=False)
        appended = run_ingest(dataclasses.replace(appended_job, append=True), progress=False)
    assert {p.name: p.read_bytes() for p in output.glob("*.tar") if p.name in shards_before} == shards_before
    assert appended["input_rows"] == 35 + 11
    assert appended["kept"] + appended["dropped_total"] == 46
    assert [r["kind"] for r in appended["rounds"]] == ["list", "retry", "append"]
    assert appended["rounds"][2]["shards"] == ["00004"]
    samples = read_shards(output)
    assert len(samples) == appended["kept"] and len({s["key"] for s in samples}) == len(samples)
    # Readers of the whole set take shards whose companions differ in columns (retry_of in one round only).
    assert sample_count(output) == (appended["kept"], MANIFEST)
    assert sorted(captions(output)) == sorted(s["txt"] for s in samples)
    again = latest_drops(output).to_pandas().set_index("caption").loc["again"]
    assert (again["status"], again["duplicate_of"]) == ("duplicate_exact", first_keys[copied])
    # Appending the same list again is its round's resume: nothing new.
    assert run_ingest(dataclasses.replace(appended_job, append=True), progress=False)["rounds"] == appended["rounds"]


def test_resume_after_a_kill_at_every_marker_matches_uninterrupted_run(ray_session, small_corpus, tmp_path):
    """Kill the real pipeline process once after each resume marker appears (settings, three parts downloaded,
    dedup done, a shard written), resuming each time, then let it finish: the same dataset as one uninterrupted run
    (on the session's Ray), and no temporary left behind.

    The image server runs here, outside the job, as a real one would: killing the job does not kill it.
    """
    from components.data.emoji_corpus import serve_corpus, write_url_list
    from tests.helpers import kill_when, run_stage

    with serve_corpus(small_corpus) as server:
        url_list = write_url_list(small_corpus, server.base_url, tmp_path / "urls.parquet")
        common = ["data=url_list", f"data.url_list={url_list}", "ingest.shard_size=5", "ingest.workers=1",
                  "data.allow_networks=[127.0.0.1/32]", "progress=false"]
        interrupted = tmp_path / "interrupted"
        work = interrupted / "_work"
        args = [*common, f"data.output_dir={interrupted}"]
        markers = {
            "settings": lambda: (work / "settings.json").exists(),
            "three parts downloaded": lambda: len(list((work / "staging").glob("*.done"))) >= 3,
            "dedup": lambda: (work / "dedup.done").exists(),
            "a shard written": lambda: any(interrupted.glob("*_stats.json")),
        }
        for marker, reached in markers.items():
            assert kill_when(args, reached, cwd=tmp_path), f"the run finished before it was killed at: {marker}"
            assert not (interrupted / "_manifest.json").exists(), marker
        run_stage("ingest", *args, cwd=tmp_path)  # the last resume runs in-process: the kills were the point
        reference = tmp_path / "reference"
        run_stage("ingest", *common, f"data.output_dir={reference}", cwd=tmp_path)

    resumed, full = read_shards(interrupted), read_shards(reference)
    assert len({s["key"] for s in resumed}) == len(resumed)  # no duplicate sample
    assert [(s["key"], s["txt"], s["image"]) for s in resumed] == [(s["key"], s["txt"], s["image"]) for s in full]
    first, second = (json.loads((d / "_manifest.json").read_text()) for d in (interrupted, reference))
    assert (first["kept"], first["dropped"]) == (second["kept"], second["dropped"])
    assert first["input_rows"] == 2 * CORPUS_LIMIT
    assert not [p for p in interrupted.rglob("*") if p.name.endswith(".tmp")]


def test_shards_round_trip_through_ray_and_webdataset(ray_session, small_corpus, tmp_path):
    import ray
    import webdataset as wds

    from components.data.emoji_corpus import write_local_list

    url_list = write_local_list(small_corpus, tmp_path / "local.parquet")
    run_ingest(make_job(url_list, tmp_path / "shards", shard_size=30), progress=False)
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 3
    metadata = pd.concat([pd.read_parquet(p.replace(".tar", ".parquet")) for p in shards]).set_index("key")

    via_webdataset = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    via_ray = {r["__key__"]: r for r in ray.data.read_webdataset(shards, decoder=None).iter_rows()}
    assert set(via_webdataset) == set(via_ray) == set(metadata.index)
    for key, sample in via_webdataset.items():
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == via_ray[key]["txt"].decode() == metadata.loc[key, "caption"]
        assert meta == json.loads(via_ray[key]["json"])
        assert meta["caption_ja"] == metadata.loc[key, "caption_ja"]
        assert meta["width"] == metadata.loc[key, "width"] == 48
        assert Image.open(io.BytesIO(sample["jpg"])).size == (48, 48)
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())  # open_clip reads dataset size here
    assert sum(sizes.values()) == len(metadata)


def test_local_images_from_a_folder_or_a_path_column_are_ingested_and_accounted_for(ray_session, small_corpus,
                                                                                    tmp_path):
    """data=image_folder: a nested folder of image + .txt pairs (one image without its .txt, one .png that is no
    image), then a list naming files in a path column (one of them missing). Every file is a row, kept or dropped
    by reason."""
    import shutil

    from tests.helpers import run_stage

    originals = sorted(small_corpus.rglob("*.png"))[:8]
    folder = tmp_path / "photos"
    captions = {}
    for number, original in enumerate(originals):
        image = folder / ("nested" if number % 2 else "") / f"photo{number}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(original, image)
        if number != 3:  # photo3 has no caption
            captions[image.name] = f"a drawing number {number}"
            image.with_suffix(".txt").write_text(captions[image.name] + "\n")
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "broken.txt").write_text("a broken file")
    no_dedup = ["filters.exact_dedup.enabled=false", "filters.near_dedup.enabled=false", "progress=false"]

    run_stage("ingest", "data=image_folder", f"data.root={folder}", f"data.output_dir={tmp_path / 'shards'}",
              *no_dedup, cwd=tmp_path)
    manifest = json.loads((tmp_path / "shards" / "_manifest.json").read_text())
    assert manifest["input_rows"] == 9 and manifest["kept"] == 7
    assert {k: v for k, v in manifest["dropped"].items() if v} == {"caption_length": 1, "not_an_image": 1}
    rows = read_shards(tmp_path / "shards")
    assert {Path(r["json"]["url"]).name: r["txt"] for r in rows} == captions

    listed_files = pd.DataFrame({"path": [str(folder / "photo0.png"), str(folder / "gone.png"),
                                          str(folder / "nested" / "photo1.png")],
                                 "caption": ["first", "missing", "second"]})
    listed_files.to_csv(tmp_path / "files.csv", index=False)
    run_stage("ingest", "data=image_folder", f"data.url_list={tmp_path / 'files.csv'}",
              f"data.output_dir={tmp_path / 'listed'}", *no_dedup, cwd=tmp_path)
    manifest = json.loads((tmp_path / "listed" / "_manifest.json").read_text())
    assert manifest["kept"] == 2 and {k: v for k, v in manifest["dropped"].items() if v} == {"file_missing": 1}, \
        manifest


def test_demo_pipeline_downloads_corpus_and_logs_to_mlflow(ray_session, tmp_path, capsys):
    """pipelines/ingest.py as `make demo` runs it (built-in corpus over HTTP), on a small slice."""
    import mlflow

    from tests.helpers import free_port, run_stage

    run_stage("ingest", "data.limit=15", f"data.corpus_dir={tmp_path / 'corpus'}", f"data.server_port={free_port()}",
              f"data.output_dir={tmp_path / 'shards'}", "progress=false", cwd=tmp_path)
    assert "accounting: input 30 = kept" in capsys.readouterr().out

    manifest = json.loads((tmp_path / "shards" / "_manifest.json").read_text())
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs(client.get_experiment_by_name("clipforge").experiment_id)
    assert run.data.metrics["kept"] == manifest["kept"] > 20
    assert run.data.metrics["input_rows"] == 30
    assert run.data.params["data.source"] == "emoji_http"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "ingest")}
    assert artifacts == {"ingest/manifest.json", "ingest/samples.png"}


def test_bad_url_list_is_one_clear_line_and_exit_code_2(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    # A folder of lists, the second of which lacks the caption column: that file is named.
    (tmp_path / "lists").mkdir()
    lists = tmp_path / "lists"
    pd.DataFrame({"url": ["http://127.0.0.1/a.png"], "caption": ["a"]}).to_csv(lists / "a.csv", index=False)
    pd.DataFrame({"url": ["http://127.0.0.1/b.png"], "text": ["b"]}).to_csv(lists / "b.csv", index=False)
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "ingest.py"), "data=url_list",
                           f"data.url_list={tmp_path / 'lists'}", f"data.output_dir={tmp_path / 'out'}",
                           "progress=false", "ray.num_cpus=1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("ingest: ")]
    assert len(errors) == 1 and "b.csv lacks column(s) ['caption']" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr  # refused before anything started


def test_credentials_in_the_lists_url_are_recorded_nowhere(ray_session, faults, tmp_path, capsys):
    """A URL list behind a presigned URL, fetched over HTTP with user:pass@ and a signature in its query string: the
    list is read, and neither secret reaches the MLflow parameters, the manifest, the resume marker or the output."""
    import mlflow

    from tests.helpers import run_stage

    server, _, corpus = faults
    pairs = pd.DataFrame({"url": [f"{server.base_url}/{p}" for p in corpus["image_path"][:4]],
                          "caption": corpus["caption"][:4]}).to_csv(index=False).encode()
    server.routes["/pairs.csv"] = lambda handler: send_bytes(handler, pairs, "text/csv")
    host = server.base_url.removeprefix("http://")
    run_stage("ingest", "data=url_list", f"data.url_list='http://reader:pa55word@{host}/pairs.csv?X-Sig=s3cr3t'",
              f"data.output_dir={tmp_path / 'shards'}", "data.allow_networks=[127.0.0.1/32]", "progress=false",
              cwd=tmp_path)
    output = capsys.readouterr().out
    manifest = json.loads((tmp_path / "shards" / "_manifest.json").read_text())
    assert manifest["input_rows"] == 4 and manifest["url_list"] == f"http://<redacted>@{host}/pairs.csv?<redacted>"
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs(client.get_experiment_by_name("clipforge").experiment_id)
    assert run.data.params["data.url_list"] == manifest["url_list"]
    recorded = [json.dumps(run.data.params), output, (tmp_path / "shards" / "_manifest.json").read_text(),
                *(p.read_text() for p in (tmp_path / "shards").rglob("*.json"))]
    assert not [text for text in recorded if "s3cr3t" in text or "pa55word" in text]
