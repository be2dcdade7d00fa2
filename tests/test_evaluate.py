"""The evaluation stage end to end: pipelines/evaluate.py on the session's Ray (model actors, MLflow) and as a
command (its driver's memory), on the session's trained tiny CLIP and on a random-init copy of it, on the held-out
concepts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, brute_force_retrieval_metrics, clip_benchmark_build, read_shards, run_stage

pytestmark = pytest.mark.slow

ALL_TASKS = ("[zeroshot_classification,retrieval,linear_probe,multilingual_retrieval,typographic_attack,"
             "alignment_maps]")
PROBE_DRAWS = 8  # few-shot draws averaged: one draw of 16 images a group is noisier than the models' difference


def evaluate(model: str, data: Path, out: Path, *extra: str) -> None:
    """pipelines/evaluate.py model=<model> data=<data> on the session's Ray, results into `out`."""
    run_stage("evaluate", f"model_uri={model}", f"data_path={data}", f"output_dir={out}", "progress=false", *extra,
              cwd=out)


def results(out: Path) -> dict[str, dict]:
    """{task or task.language: result} from the results/*.json files."""
    found = {}
    for path in sorted((out / "results").glob("*.json")):
        result = json.loads(path.read_text())
        assert set(result) == {"dataset", "model", "pretrained", "task", "metrics", "language"}, path
        key = result["task"] + (f".{result['language']}" if result["task"] == "multilingual_retrieval" else "")
        found[key] = result["metrics"]
    return found


@pytest.fixture(scope="module")
def random_clip(pretrained_clip, tmp_path_factory) -> Path:
    """A CLIP of the trained model's exact config, initialised as training starts (transformers' init), with
    the same tokenizer."""
    import torch
    from transformers import CLIPModel

    from components.models.clip import CLIP
    from components.models.factory import load_model
    from components.models.tokenizer import load_tokenizer

    export = pretrained_clip.export
    trained = load_model(export)
    torch.manual_seed(0)
    model = CLIP(CLIPModel(trained.model.config), trained.image_mean, trained.image_std)
    out = tmp_path_factory.mktemp("random_clip")
    model.save_pretrained(out)
    load_tokenizer(export).save_pretrained(out)
    return out


def test_trained_model_beats_random_init_on_every_task(ray_session, pretrained_clip, random_clip, emoji_shards,
                                                       tmp_path, capsys, monkeypatch):
    trained_out, random_out = tmp_path / "trained", tmp_path / "random"
    trained_out.mkdir(), random_out.mkdir()
    # Held-out concepts; the probe learns emoji groups on the training concepts (subgroups, 99 classes, separate
    # trained from random-init features by less than the noise at this scale).
    common = [f"tasks={ALL_TASKS}", "where={split: test}", "task_settings.linear_probe.train_where={split: train}",
              "task_settings.linear_probe.label=group", "task_settings.linear_probe.shots=[16]",
              f"task_settings.linear_probe.draws={PROBE_DRAWS}"]
    # The trained model by its registry URI (lineage, nesting, tags); the random one as a plain directory.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pretrained_clip.tracking_uri)
    evaluate("models:/clipforge-clip/1", emoji_shards, trained_out, *common)
    printed = capsys.readouterr().out
    evaluate(str(random_clip), emoji_shards, random_out, *common)
    trained, random = results(trained_out), results(random_out)
    print(json.dumps({"trained": trained, "random": random}, indent=1))
    assert "zeroshot_classification" in printed and "image_to_text_R5" in printed

    # Measured here (trained vs random, 370 held-out images of 184 concepts): zero-shot acc@5 0.081 vs 0.027,
    # retrieval R@5 ~0.07 vs ~0.01. Margins leave room for run-to-run noise.
    zs_t, zs_r = trained["zeroshot_classification"], random["zeroshot_classification"]
    assert zs_t["acc1"] > zs_r["acc1"] and zs_t["acc5"] >= zs_r["acc5"] + 0.03
    rt_t, rt_r = trained["zeroshot_retrieval"], random["zeroshot_retrieval"]
    assert rt_t["image_to_text_R5"] >= rt_r["image_to_text_R5"] + 0.03
    # CLIP_benchmark's own `build` reads every result of the directory into its table.
    clip_benchmark_build([trained_out / "results"], tmp_path / "benchmark.csv")
    table = pd.read_csv(tmp_path / "benchmark.csv")
    assert len(table) == len(list((trained_out / "results").glob("*.json"))) == len(trained)
    assert table.loc[table.task == "zeroshot_retrieval", "text_retrieval_recall@5"].item() == \
        pytest.approx(rt_t["image_to_text_R5"])
    assert rt_t["text_to_image_R5"] >= rt_r["text_to_image_R5"] + 0.03
    # The group probe (9 groups). Both feature sets beat the commonest group's share by far; with 16 images a group
    # the trained features lead on average over draws (each draw pairs the two models on the same images). Measured
    # on four trained models: full 0.604/0.622/0.624/0.635 vs 0.568-0.591; 16-shot per draw 0.39-0.52 vs 0.31-0.44,
    # the trained features ahead in 22 of 23 paired draws, by -0.008 to 0.13 (a suite run failed on that one draw
    # when the test used a single one); over 8 draws that model led by 0.065 on average.
    groups = pd.Series([s["json"]["group"] for s in read_shards(emoji_shards) if s["json"]["split"] == "test"])
    majority = groups.value_counts(normalize=True).iloc[0]
    assert min(trained["linear_probe"]["acc1"], random["linear_probe"]["acc1"]) > majority + 0.1, majority
    assert trained["linear_probe_16shot"]["draws"] == PROBE_DRAWS
    assert trained["linear_probe_16shot"]["acc1"] >= random["linear_probe_16shot"]["acc1"] + 0.02
    languages = [k for k in trained if k.startswith("multilingual_retrieval.")]
    assert len(languages) == 14
    assert trained["multilingual_retrieval.en"]["image_to_text_R5"] >= \
        random["multilingual_retrieval.en"]["image_to_text_R5"] + 0.03
    mean_r5 = {name: np.mean([r[k]["image_to_text_R5"] for k in languages]) for name, r in
               (("trained", trained), ("random", random))}
    assert mean_r5["trained"] > mean_r5["random"]
    # The attack (a wrong label drawn on the image; the drawing is checked in test_eval_visuals.py) moves the trained
    # model's acc@1 of 1-3% by a few of 369 images either way: in six suite runs it cost 0.003-0.022 and once gained
    # 0.013, so its direction is noise at this scale. What must hold: the clean side is the zero-shot task's own
    # accuracy and the drop is clean minus attacked.
    attack = trained["typographic_attack"]
    assert attack["acc1_drop"] == pytest.approx(attack["clean_acc1"] - attack["attacked_acc1"], abs=1e-4)
    assert trained["typographic_attack"]["clean_acc1"] == pytest.approx(zs_t["acc1"])

    plots = {p.name for p in (trained_out / "results").glob("*.png")}
    assert {"zeroshot_confusion.png", "retrieval_grid.png", "multilingual_retrieval.png",
            "alignment_0.png"} <= plots

    # MLflow: the evaluation run nests under the training run; the registry version carries the headline.
    client = MlflowClient(pretrained_clip.tracking_uri)
    version = client.get_model_version("clipforge-clip", "1")
    # (The store also holds the chain's own evaluate stage, nested under the chain's parent run.)
    evaluation = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    f"tags.stage = 'evaluate' and tags.mlflow.parentRunId = '{version.run_id}'")
    assert len(evaluation) == 1
    assert evaluation[0].data.metrics["zeroshot_classification.acc1"] == pytest.approx(zs_t["acc1"], abs=1e-4)
    assert float(version.tags["eval.zeroshot_retrieval.image_to_text_R5"]) == \
        pytest.approx(rt_t["image_to_text_R5"], abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(evaluation[0].info.run_id, "evaluation")}
    assert "evaluation/zeroshot_classification.json" in artifacts


def _parquet_with_foreign_names(shards: Path, path: Path, rows: int = 96) -> list[dict]:
    """Held-out samples under other names, two captions per image (the caption and its Spanish name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = [s for s in read_shards(shards) if s["json"]["split"] == "test"][:rows]
    table = [{"picture": s["image"], "alt_texts": [s["json"]["caption_en"], s["json"]["caption_es"]],
              "category": s["json"]["group"]} for s in samples]
    pq.write_table(pa.Table.from_pylist(table), path)
    return table


def test_foreign_field_names_through_config_alone_match_a_brute_force_reference(ray_session, pretrained_clip,
                                                                                  emoji_shards, tmp_path):
    """Retrieval with two captions per image and zero-shot with a prompt ensemble, against one matrix computed in
    this process."""
    from components.eval.tasks import caption_lists_relevance
    from components.models.factory import load_model_and_text
    from components.models.inference import embed_images, embed_texts

    rows = _parquet_with_foreign_names(emoji_shards, tmp_path / "foreign.parquet")
    out = tmp_path / "out"
    out.mkdir()
    export = pretrained_clip.export
    templates = ["{}", "a drawing of {}", "{} emoji"]
    evaluate(str(export), tmp_path / "foreign.parquet", out, "fields=webdataset", "fields.image=[picture]",
             "fields.caption=alt_texts", "+fields.labels.kind=category", "where={}", "block=16",
             "tasks=[retrieval,zeroshot_classification]", "task_settings.zeroshot_classification.label=kind",
             "task_settings.zeroshot_classification.templates=[" + ",".join(f"'{t}'" for t in templates) + "]")
    got = results(out)

    # Reference: every image against every unique caption in one matrix, in this process.
    model, text = load_model_and_text(export)
    texts, image_texts, _ = caption_lists_relevance([r["alt_texts"] for r in rows])
    images = embed_images(model, [r["picture"] for r in rows])
    similarity = images @ embed_texts(model, text, texts).T
    pairs = [(image, text) for image, owned in enumerate(image_texts) for text in owned]
    expected = brute_force_retrieval_metrics(similarity, pairs)
    for key, value in expected.items():
        assert got["zeroshot_retrieval"][key] == pytest.approx(value, abs=1e-6), key
    assert got["zeroshot_retrieval"]["texts"] == len(texts) > len(rows)  # two captions per image

    # Zero-shot: each class scored by the renormalised mean of its prompts' embeddings (CLIP's ensemble).
    classes = sorted({r["category"] for r in rows})
    prompts = embed_texts(model, text, [t.format(c) for c in classes for t in templates])
    ensemble = prompts.reshape(len(classes), len(templates), -1).mean(axis=1)
    scores = images @ (ensemble / np.linalg.norm(ensemble, axis=1, keepdims=True)).T
    truth = np.array([classes.index(r["category"]) for r in rows])
    zero_shot = got["zeroshot_classification"]
    assert zero_shot["classes"] == len(classes) and zero_shot["templates"] == len(templates)
    assert zero_shot["acc1"] == pytest.approx(float((scores.argmax(axis=1) == truth).mean()), abs=1e-6)
    # ... which moves every score off the bare class names' (the ensemble's formula itself is checked exactly, model
    # free, in tests/test_models.py). Whether the two also disagree on a prediction depends on the session's model:
    # in one suite run in five or so they agreed on all 96 rows of these 2 classes, and an argmax check failed.
    bare = images @ prompts.reshape(len(classes), len(templates), -1)[:, 0].T
    assert np.abs(scores - bare).mean() > 1e-3, np.abs(scores - bare).mean()


def _replicated_shards(shards: Path, out: Path, copies: int) -> int:
    """The held-out samples `copies` times, each copy with its own keys and captions (so texts grow too)."""
    out.mkdir()
    samples = [s for s in read_shards(shards) if s["json"]["split"] == "test"]
    with tarfile.open(out / "00000.tar", "w") as tar:
        for copy in range(copies):
            for sample in samples:
                key = f"{copy:03d}{sample['key']}"
                meta = {**sample["json"], "caption": f"{sample['json']['caption']} {copy}"}
                for suffix, data in (("png", sample["image"]), ("json", json.dumps(meta).encode()),
                                     ("txt", meta["caption"].encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return copies * len(samples)


def _peak_rss_mib(command: list[str], cwd: Path, env: dict) -> float:
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    output = process.stdout.read()
    assert process.returncode == 0, output[-3000:]
    return peak / 2**20


def test_ten_times_the_samples_keeps_driver_memory_flat(pretrained_clip, emoji_shards, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def peak(copies: int) -> tuple[int, float]:
        data = tmp_path / f"x{copies}"
        rows = _replicated_shards(emoji_shards, data, copies)
        out = tmp_path / f"out{copies}"
        out.mkdir()
        command = [sys.executable, str(REPO / "pipelines" / "evaluate.py"), f"model={pretrained_clip.export}",
                   f"data={data}", f"output_dir={out}", "progress=false", f"hydra.run.dir={out / 'hydra'}", "where={}",
                   "tasks=[retrieval,zeroshot_classification]", "block=128"]
        return rows, _peak_rss_mib(command, out, dict(os.environ))

    # Both processes at once (each its own Ray): a process's peak is its own, and their start-ups overlap.
    with ThreadPoolExecutor(2) as pool:
        peaks = dict(pool.map(peak, (1, 10)))
    (small, small_peak), (large, large_peak) = sorted(peaks.items())
    print(f"driver peak RSS: {small} rows {small_peak:.0f} MiB, {large} rows {large_peak:.0f} MiB")
    assert large == 10 * small
    assert large_peak - small_peak < 150, peaks


def write_clip_benchmark_folder(root: Path, corpus_dir: Path, classes: list[str] | None) -> list[dict]:
    """The small corpus as a dataset in CLIP_benchmark's WebDataset layout: test/{0,1}.tar + nshards.txt, and
    either `cls` labels with classnames.txt and a templates file (`classes`), or a retrieval set whose `txt`
    holds two captions per image. Returns the samples written."""
    import webdataset as wds

    from components.data.emoji_corpus import load_corpus

    corpus = load_corpus(corpus_dir)
    (root / "test").mkdir(parents=True)
    samples = []
    for i, row in corpus.iterrows():
        sample = {"__key__": f"s{i:04d}", "png": (corpus_dir / row["image_path"]).read_bytes()}
        if classes:
            sample["cls"] = str(classes.index(row["caption"])).encode()
        else:
            sample["txt"] = f"{row['caption']}\n{row['caption']} picture {i}".encode()
        samples.append(sample)
    for shard, half in enumerate((samples[: len(samples) // 2], samples[len(samples) // 2:])):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as tar:
            for sample in half:
                tar.write(sample)
    (root / "test" / "nshards.txt").write_text("2\n")
    if classes:
        (root / "classnames.txt").write_text("\n".join(classes) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nan emoji of {c}.\n")
    else:
        (root / "dataset_type.txt").write_text("retrieval\n")
    return samples


def test_a_clip_benchmark_dataset_folder_is_evaluated_as_clip_benchmark_reads_it(ray_session, small_corpus, tmp_path,
                                                                                 capfd):
    """`data=<CLIP_benchmark dataset folder>` with no other setting: zero-shot over every class of its
    classnames.txt (one absent from the split included) with its own templates, or retrieval over every caption
    line of a retrieval set; what the folder cannot serve is skipped in one line; CLIP_benchmark's build reads
    the results. The model is any transformers CLIP (one saved in OpenAI's layout)."""
    from components.data.emoji_corpus import load_corpus
    from tests.helpers import save_openai_layout_clip

    corpus = load_corpus(small_corpus)
    model = save_openai_layout_clip(tmp_path / "clip", list(corpus["caption"]))
    classes = sorted(set(corpus["caption"])) + ["a class with no image in the split"]
    write_clip_benchmark_folder(tmp_path / "emoji_concepts", small_corpus, classes)
    (tmp_path / "out").mkdir()
    capfd.readouterr()
    evaluate(str(model), tmp_path / "emoji_concepts", tmp_path / "out")
    assert "[evaluate] retrieval skipped" in capfd.readouterr().out
    zero_shot = json.loads((tmp_path / "out" / "results" / "zeroshot_classification.json").read_text())
    assert zero_shot["dataset"] == "emoji_concepts"
    assert zero_shot["metrics"]["classes"] == len(classes) and zero_shot["metrics"]["templates"] == 2
    clip_benchmark_build([tmp_path / "out" / "results"], tmp_path / "benchmark.csv")
    table = pd.read_csv(tmp_path / "benchmark.csv")
    assert table.loc[table.task == "zeroshot_classification", "acc1"].item() == \
        pytest.approx(zero_shot["metrics"]["acc1"])

    samples = write_clip_benchmark_folder(tmp_path / "emoji_captions", small_corpus, None)
    (tmp_path / "out_retrieval").mkdir()
    evaluate(str(model), tmp_path / "emoji_captions", tmp_path / "out_retrieval")
    assert "[evaluate] zeroshot_classification skipped" in capfd.readouterr().out
    retrieval = json.loads((tmp_path / "out_retrieval" / "results" / "zeroshot_retrieval.json").read_text())
    lines = {line for s in samples for line in s["txt"].decode().splitlines()}
    assert (retrieval["metrics"]["images"], retrieval["metrics"]["texts"]) == (len(samples), len(lines))


def write_standard_datasets(root: Path, corpus_dir: Path) -> dict[str, Path]:
    """The small corpus written as ImageNet-style class folders (with a class-names file naming two of three
    folders), as Flickr30k in Karpathy's split JSON (five captions an image, one image in the train split), and
    as CIFAR-10's Python pickles (its images shrunk to 32x32). Returns each dataset's path."""
    import pickle

    from PIL import Image

    from components.data.emoji_corpus import load_corpus

    corpus = load_corpus(corpus_dir).head(24)
    images = [(corpus_dir / p).read_bytes() for p in corpus["image_path"]]
    folders = root / "imagenet"
    for i, image in enumerate(images):
        (folders / "val" / f"n0000000{i % 3}").mkdir(parents=True, exist_ok=True)
        (folders / "val" / f"n0000000{i % 3}" / f"ILSVRC2012_val_{i:08d}.png").write_bytes(image)
    (folders / "classnames.txt").write_text("n00000000 grinning face\nn00000001 red apple\n")
    flickr = root / "flickr30k"
    (flickr / "flickr30k-images").mkdir(parents=True)
    entries = []
    for i, (image, caption) in enumerate(zip(images, corpus["caption"])):
        (flickr / "flickr30k-images" / f"{i}.png").write_bytes(image)
        entries.append({"filename": f"{i}.png", "imgid": i, "split": "train" if i == 0 else "test",
                        "sentences": [{"raw": f"{caption}, picture {i}, caption {k}"} for k in range(5)]})
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((32, 32))) for b in images])
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (cifar / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    (cifar / "test_batch").write_bytes(pickle.dumps({b"data": pixels.transpose(0, 3, 1, 2).reshape(len(images), -1),
                                                     b"labels": [i % 4 for i in range(len(images))]}))
    return {"imagenet": folders, "flickr30k": flickr, "cifar10": root}


def test_standard_datasets_are_read_in_the_layouts_they_are_distributed_in(ray_session, small_corpus, tmp_path):
    """ImageNet class folders, Karpathy-split captions and CIFAR pickles, each written in its exact format, give
    zero-shot over their classes or multi-caption retrieval over their test split, with no other setting."""
    from components.data.emoji_corpus import load_corpus
    from tests.helpers import save_openai_layout_clip

    model = save_openai_layout_clip(tmp_path / "clip", list(load_corpus(small_corpus)["caption"]))
    paths = write_standard_datasets(tmp_path / "data", small_corpus)

    def results(name: str, *extra: str) -> dict:
        out = tmp_path / f"out_{name}"
        out.mkdir()
        evaluate(str(model), paths[name], out, *extra)
        return {p.stem: json.loads(p.read_text())["metrics"] for p in (out / "results").glob("*.json")}

    imagenet = results("imagenet", "data_split=val")
    assert set(imagenet) == {"zeroshot_classification"} and imagenet["zeroshot_classification"]["classes"] == 3
    flickr = results("flickr30k")
    assert set(flickr) == {"zeroshot_retrieval"}
    assert (flickr["zeroshot_retrieval"]["images"], flickr["zeroshot_retrieval"]["texts"]) == (23, 23 * 5)
    cifar = results("cifar10", "task_settings.zeroshot_classification.templates=cifar10")
    assert cifar["zeroshot_classification"]["classes"] == 10
    assert cifar["zeroshot_classification"]["templates"] == 18  # CLIP_benchmark's CIFAR-10 set

