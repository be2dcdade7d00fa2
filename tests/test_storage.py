"""Locations on a local disk and in an object store (components/storage.py), against a real S3 API on loopback
(moto's server): the round trips, and atomic writes that leave nothing behind on failure. The pipelines on a
bucket (ingest into it, pretraining from it) are tested as a cluster uses them, in tests/test_ray_job.py."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from components import storage


def test_a_failed_local_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "stats.json"
    with pytest.raises(RuntimeError), storage.atomic_write(target) as file:
        file.write(b"half")
        raise RuntimeError("the writer died")
    assert list(tmp_path.iterdir()) == []
    storage.write_text(target, "{}")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_local_locations_are_absolute_paths_and_urls_stay_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.location("data/shards") == tmp_path / "data" / "shards"
    assert not storage.is_remote(storage.location("data/shards"))
    assert str(storage.location("s3://bucket/shards")) == "s3://bucket/shards"
    assert storage.is_remote("s3://bucket/shards") and storage.is_remote("gs://bucket/shards")


def test_object_store_round_trips(object_store, tmp_path):
    root = storage.location(f"{object_store}/round-trip")
    table = pa.table({"key": ["a", "b"], "value": [1, 2]})
    storage.write_parquet(table, root / "rows.parquet")
    assert storage.read_parquet(root / "rows.parquet").equals(table)
    assert storage.parquet_rows(root / "rows.parquet") == 2

    with storage.staged_directory(root / "export") as local:
        (local / "config.json").write_text('{"family": "clip"}')
        (local / "nested").mkdir()
        (local / "nested" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    assert sorted(p.name for p in (root / "export").rglob("*") if p.is_file()) == ["config.json", "weights.bin"]
    with storage.local_copy(root / "export") as copy:
        assert json.loads((copy / "config.json").read_text()) == {"family": "clip"}
        assert (copy / "nested" / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert not copy.exists()  # a scratch copy, gone after the block

    with pytest.raises(RuntimeError), storage.atomic_write(root / "broken.tar") as file:
        file.write(b"half a shard")
        raise RuntimeError("the writer died")
    assert not (root / "broken.tar").exists()  # an object appears whole or not at all

    storage.remove_tree(root / "export")
    assert not (root / "export").exists() and (root / "rows.parquet").exists()
    with pytest.raises(FileNotFoundError):
        storage.download(root / "missing", tmp_path / "missing")


def test_an_export_in_a_bucket_is_a_model_for_evaluation(object_store, tmp_path):
    import torch

    from components.eval.runner import resolve_model
    from components.models.factory import build_model, load_model

    model = build_model("clip", "tiny", vocab_size=64)
    with storage.staged_directory(f"{object_store}/models/clip") as local:
        model.save_pretrained(local)
    resolved = resolve_model(f"{object_store}/models/clip", tmp_path / "download")
    assert resolved.uri == f"{object_store}/models/clip" and resolved.run_id is None
    loaded = load_model(resolved.directory)
    for (name, original), (_, copy) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(original, copy), name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(f"{object_store}/models/missing", tmp_path / "missing")


def test_a_model_shipped_through_rays_object_store_loads_where_the_drivers_copy_is_gone(ray_session, tmp_path):
    """evaluate.py downloads a registered model into the driver's scratch; its actors on other nodes cannot read
    that disk, so they get the export through Ray's object store and unpack their own copy."""
    import shutil

    import ray
    import torch

    from components.eval.embed import ShippedExport, load_export
    from components.eval.runner import ResolvedModel
    from components.models.factory import build_model

    model = build_model("clippo", "tiny")
    export = tmp_path / "scratch" / "model"
    model.save_pretrained(export)
    files = ShippedExport.files_of(export)
    resolved = ResolvedModel(export, "models:/clipforge-clippo/1").shipped()
    assert resolved.shipped() is resolved  # packed once
    shutil.rmtree(export)  # what a worker on another node sees of the driver's scratch

    @ray.remote
    def unpacked(source):
        with source.local_copy() as local:
            return ShippedExport.files_of(local)

    assert ray.get(unpacked.remote(resolved.for_workers)) == files and len(files) >= 2
    loaded, text = load_export(resolved.for_workers)  # the actors' loader takes it as it is
    assert "text_pixels" in text(["a caption"])  # CLIPPO reads rendered text
    for name, original in model.state_dict().items():
        assert torch.equal(original, loaded.state_dict()[name]), name
    in_bucket = ResolvedModel(export, "s3://models/clippo", shared="s3://models/clippo")
    assert in_bucket.shipped().for_workers == "s3://models/clippo"  # workers already read the bucket copy


def test_a_cache_in_a_bucket_is_complete_only_with_its_marker(object_store, capsys):
    from components.cache import DONE, computed_once

    root = storage.location(f"{object_store}/caches")

    def dies(directory):
        storage.write_text(directory / "half.txt", "half")
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError):
        computed_once(root, "k1", dies, "rows", "test")
    assert (root / "k1" / "half.txt").exists() and not (root / "k1" / DONE).exists()  # no rename: no marker

    def writes(directory):
        storage.write_text(directory / "rows.txt", "rows")
        return {"rows": 1}

    out = computed_once(root, "k1", writes, "rows", "test")
    assert out == root / "k1" and sorted(p.name for p in out.iterdir()) == [DONE, "rows.txt"]  # the half is gone
    assert json.loads((out / DONE).read_text()) == {"rows": 1, "what": "rows"}
    capsys.readouterr()
    assert computed_once(root, "k1", dies, "rows", "test") == out and "cached" in capsys.readouterr().out


def test_model_files_in_a_bucket_are_read_through_local_copies(object_store, tmp_path):
    """What a training worker on any node does with a spec naming bucket files (a whitening file, a decoder)."""
    import torch

    from components.caption.model import EmbeddingWhitening
    from components.train.tasks import build_captioner_module
    from components.workflow import StateFile

    bucket = storage.location(object_store)
    whitening = EmbeddingWhitening.fit(torch.randn(64, 16).numpy(), 0.1)
    whitening.save(bucket / "whitening.safetensors")
    spec = {"clip_dim": 16, "vocab_size": 50, "prefix_length": 2, "whitening": str(bucket / "whitening.safetensors")}
    with storage.local_paths(spec, ("whitening", "pretrained")) as local:
        assert local["whitening"] != spec["whitening"] and "pretrained" not in local
        assert torch.equal(EmbeddingWhitening.load(local["whitening"]).matrix, whitening.matrix)
    assert not storage.location(local["whitening"]).exists()  # removed after the block
    captioner = build_captioner_module(spec)
    assert torch.equal(captioner.whitening.matrix, whitening.matrix)

    (tmp_path / "export" / "nested").mkdir(parents=True)
    (tmp_path / "export" / "nested" / "weights.bin").write_bytes(b"w")
    storage.upload(tmp_path / "export", bucket / "export")
    storage.upload(tmp_path / "export", bucket / "export")  # replaces, never nests
    assert [p.path for p in (bucket / "export").rglob("*") if p.is_file()] == [
        (bucket / "export" / "nested" / "weights.bin").path]

    state = StateFile(bucket / "workflow" / "state.json")
    state.put("ingest", {"key": "k", "status": "done"})
    assert StateFile(bucket / "workflow" / "state.json").get("ingest") == {"key": "k", "status": "done"}


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_an_output_is_replaced_only_where_we_wrote_it_and_never_over_an_input(object_store, tmp_path, where):
    """replace_output: `export_dir=s3://bucket` or a filter's `output=` equal to its input used to delete what
    they named. Now an input (the location, one inside it, one holding it) and a directory of files we did not
    write are refused in one line naming the setting, with every file intact; our own output is replaced."""
    root = storage.location(object_store if where == "bucket" else tmp_path / "root")
    shards = root / "shards"
    if where == "disk":
        shards.mkdir(parents=True)
    storage.write_text(shards / "00000.tar", "shard")
    storage.write_text(root / "notes.txt", "the user's")
    for output, why in ((shards, "overlaps the input"), (shards / "filtered", "overlaps the input"),
                        (root, "overlaps the input"), (root, "holds files clipforge did not write")):
        inputs = (shards,) if why == "overlaps the input" else ()
        with pytest.raises(ValueError, match=f"^output={output} {why}"):
            storage.replace_output(output, "output", inputs=inputs)
    assert (shards / "00000.tar").read_text() == "shard" and (root / "notes.txt").read_text() == "the user's"

    output = storage.replace_output(root / "filtered", "output", inputs=(shards,))  # new: made, and marked ours
    storage.write_text(output / "00000.tar", "old output")
    output = storage.replace_output(output, "output", inputs=(shards,))  # ours: replaced
    assert sorted(p.name for p in output.iterdir()) == [storage.OUTPUT_MARKER]
    assert (shards / "00000.tar").read_text() == "shard"


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_a_held_directory_refuses_a_second_run_until_its_holder_is_gone(object_store, tmp_path, where):
    """components/lease.py: a second run on a held output is refused in one line; a lease whose holder was killed
    (its process gone on this host, or no heartbeat for STALE_AFTER_S from another host) is taken over."""
    import os
    import socket
    import subprocess
    import time

    from components import lease

    directory = storage.location(f"{object_store}/shards" if where == "bucket" else tmp_path / "shards")
    with lease.held(directory, "ingest"):
        with pytest.raises(lease.LeaseError, match=rf"shards is in use by another ingest \(pid {os.getpid()} on "):
            with lease.held(directory, "workflow"):
                pass
    assert not (directory / lease.LEASE).exists()

    killed = subprocess.Popen(["true"])
    killed.wait()
    now = time.time()
    for holder, gone in (({"host": socket.gethostname(), "pid": killed.pid, "heartbeat": now}, True),
                         ({"host": "another-host", "pid": 1, "heartbeat": now - lease.STALE_AFTER_S - 1}, True),
                         ({"host": "another-host", "pid": 1, "heartbeat": now}, False)):
        storage.write_text(directory / lease.LEASE, json.dumps({"what": "ingest", "started": now, "token": "t",
                                                                 **holder}))
        if gone:
            with lease.held(directory, "ingest"):
                assert json.loads((directory / lease.LEASE).read_text())["pid"] == os.getpid()
        else:
            with pytest.raises(lease.LeaseError, match="pid 1 on another-host"):
                with lease.held(directory, "ingest"):
                    pass
