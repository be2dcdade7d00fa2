"""AltCLIP's parts: the model built from a CLIP teacher, the XLM-R layout tokenizer, parallel text, the teacher's
cached targets (real Ray Data), stage 2's per-example caption language."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from components.data.emoji_corpus import DEFAULT_LANGUAGES, load_corpus
from components.data.parallel_text import (
    ParallelTextError,
    builtin_parallel_text,
    read_parallel_text,
)
from components.models.altclip import image_tower_state
from components.models.factory import build_model, load_model
from components.models.tokenizer import train_bpe

TEXTS = ["grinning face", "cara sonriendo", "にっこり笑う", "visage rieur", "grinsendes gesicht",
         "red heart", "corazón rojo", "赤いハート", "cœur rouge", "rotes herz"] * 5


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random tiny CLIP saved with its tokenizer: the shape of what pretraining exports."""
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    teacher = build_model("clip", "tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def student_tokenizer():
    return train_bpe(TEXTS, vocab_size=300, layout="xlmr")


def student(teacher_dir, tokenizer, **kwargs):
    return build_model("altclip", "tiny", vocab_size=len(tokenizer), teacher=str(teacher_dir),
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **kwargs)


def tokens(model, tokenizer, texts):
    encoded = tokenizer(texts, padding="max_length", max_length=model.max_text_length, truncation=True,
                        return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def test_xlmr_layout_tokenizer_has_xlmr_special_ids(student_tokenizer):
    assert (student_tokenizer.bos_token_id, student_tokenizer.pad_token_id, student_tokenizer.eos_token_id) == (0, 1, 2)
    ids = student_tokenizer("赤いハート")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 2
    with pytest.raises(ValueError, match="unknown tokenizer layout"):
        train_bpe(TEXTS, layout="bert")


def test_student_takes_the_teachers_image_tower_bit_for_bit_and_locks_it(teacher_dir, student_tokenizer, tmp_path):
    teacher = load_model(teacher_dir)
    model = student(teacher_dir, student_tokenizer, lock_image=True)
    ours, theirs = image_tower_state(model), image_tower_state(teacher)
    assert ours.keys() == theirs.keys() and len(ours) > 50
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(model.logit_scale, teacher.logit_scale)
    assert model.image_mean == teacher.image_mean and model.image_size == teacher.image_size
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.text_model.", "model.text_projection.", "model.logit_scale"))
                             for n in trainable)
    # The image side of the student embeds exactly as the teacher does.
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    assert torch.allclose(model.eval().embed_image(pixels), teacher.embed_image(pixels), atol=1e-6)

    model.save_pretrained(tmp_path)
    student_tokenizer.save_pretrained(tmp_path)
    from transformers import AltCLIPModel

    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "altclip"
    reloaded = load_model(tmp_path)
    batch = tokens(model, student_tokenizer, ["赤いハート", "red heart"])
    assert type(reloaded).__name__ == "AltCLIP"
    assert torch.allclose(reloaded.embed_text(batch), model.embed_text(batch), atol=1e-6)
    hf = AltCLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hf_text = hf.get_text_features(**batch)
    hf_text = getattr(hf_text, "pooler_output", hf_text)
    assert torch.allclose(hf_text, model.text_features(batch), atol=1e-5)


def test_text_features_are_the_unnormalised_first_token_and_forward_serves_stage1(teacher_dir, student_tokenizer):
    model = student(teacher_dir, student_tokenizer).eval()
    batch = tokens(model, student_tokenizer, ["grinning face", "にっこり笑う"])
    raw = model(None, batch, raw_text=True)
    assert raw.shape == (2, model.model.config.projection_dim)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), model.embed_text(batch), atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    patches, text_tokens, mask = model.token_embeddings(torch.randn(2, 3, 64, 64), batch)
    assert torch.allclose(text_tokens[:, 0], model.embed_text(batch), atol=1e-5)  # <s> is the pooled token
    assert mask.sum() == batch["attention_mask"].sum()


def test_lock_image_needs_trained_weights_and_teacher_must_be_clip(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="lock_image needs trained image weights"):
        build_model("altclip", "tiny", lock_image=True)
    filip = build_model("filip", "tiny", vocab_size=300)
    filip.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must be a clip model"):
        build_model("altclip", "tiny", teacher=str(tmp_path))


def test_pretrained_xlmr_encoder_becomes_the_text_tower(teacher_dir, tmp_path):
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                              vocab_size=120, max_position_embeddings=40)
    encoder = XLMRobertaModel(config, add_pooling_layer=False)
    encoder.save_pretrained(tmp_path)
    model = build_model("altclip", "tiny", teacher=str(teacher_dir), text_pretrained=str(tmp_path))
    layers = model.model.text_model.roberta.encoder.layers
    assert len(layers) == 2 and torch.equal(layers[1].output.dense.weight, encoder.encoder.layer[1].output.dense.weight)
    assert model.max_text_length == 40 - config.pad_token_id - 1


def test_builtin_parallel_text_pairs_every_language_with_the_corpus_english(small_corpus):
    corpus = load_corpus(small_corpus).drop_duplicates("concept").set_index("concept")
    pairs = builtin_parallel_text(small_corpus, DEFAULT_LANGUAGES)
    assert list(pairs["src"]) == sorted(pairs["src"])  # the teacher embeds each sentence about once per batch
    assert set(pairs["src"]) == set(corpus["caption_en"])
    english = pairs[pairs["lang"] == "en"]
    assert (english["src"] == english["tgt"]).all() and len(english) == len(corpus)
    japanese = pairs[(pairs["lang"] == "ja") & (pairs["tgt"].isin(corpus["caption_ja"]))]
    for row in japanese.itertuples():
        assert corpus.loc[row.concept, "caption_en"] == row.src
        assert corpus.loc[row.concept, "split"] == row.split
    assert pairs["lang"].nunique() > len(DEFAULT_LANGUAGES) + 20  # CLDR's locales beyond the corpus' 14
    assert not pairs.duplicated(["src", "tgt", "lang"]).any()


def test_read_parallel_text_checks_columns_and_keeps_translations_together(tmp_path):
    good = tmp_path / "pairs.tsv"
    rows = [("red heart", "corazón rojo", "es"), ("red heart", "赤いハート", "ja"), ("cat", "gato", "es")]
    good.write_text("src\ttgt\tlang\n" + "\n".join("\t".join(r) for r in rows) + "\n")
    pairs = read_parallel_text(good)
    assert len(pairs) == 3 and set(pairs["split"]) <= {"train", "test"}
    assert pairs[pairs["src"] == "red heart"]["split"].nunique() == 1
    parquet = tmp_path / "pairs.parquet"
    pd.DataFrame(rows, columns=["src", "tgt", "lang"]).assign(split="train").to_parquet(parquet)
    assert (read_parallel_text(parquet)["split"] == "train").all()

    missing = tmp_path / "missing.csv"
    missing.write_text("source,target\na,b\n")
    with pytest.raises(ParallelTextError, match=r"lacks column\(s\) \['src', 'tgt', 'lang'\]"):
        read_parallel_text(missing)
    empty = tmp_path / "empty.tsv"
    empty.write_text("src\ttgt\tlang\nred heart\t\tes\ncat\tgato\tes\n")
    with pytest.raises(ParallelTextError, match="1 row"):
        read_parallel_text(empty)
    with pytest.raises(ParallelTextError, match="expected .tsv"):
        (tmp_path / "pairs.json").write_text("{}")
        read_parallel_text(tmp_path / "pairs.json")


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_teacher_targets_equal_direct_inference_and_are_cached(ray_session, teacher_dir, tmp_path, capsys, request,
                                                               where):
    """On a disk, and with the stage's work_dir in an object store: the teacher is copied there for the Ray actors
    (fetch_model), and the cache is written there by them."""
    from components import storage
    from components.eval.runner import fetch_model
    from components.models.text import Tokens
    from components.train.altclip import read_targets, teacher_targets
    from components.train.data import parallel_text_dataset, split_rows

    work = storage.location(request.getfixturevalue("object_store") if where == "bucket" else tmp_path)
    teacher = fetch_model(str(teacher_dir), work / "teacher")
    assert teacher.for_workers == str(work / "teacher" if where == "bucket" else teacher_dir)
    frame = pd.DataFrame({"src": ["red heart"] * 3 + ["grinning face"] * 2 + ["cat"],
                          "tgt": ["corazón rojo", "赤いハート", "red heart", "にっこり笑う", "grinning face", "gato"],
                          "lang": ["es", "ja", "en", "ja", "en", "es"],
                          "split": ["train", "train", "train", "test", "test", "train"]})
    out = teacher_targets(frame, teacher, work / "targets", batch_size=4, actors=1, use_gpu=False)
    assert str(out).startswith(str(work)) and (out / "_cache.json").is_file()
    from components.models.factory import load_model_and_text
    from components.models.inference import text_inputs

    model, text = load_model_and_text(teacher_dir)
    for split in ("train", "test"):
        rows = read_targets(out, split)
        assert sorted(rows["tgt"]) == sorted(frame[frame["split"] == split]["tgt"])
        with torch.no_grad():
            expected = model.text_features(text_inputs(model, text, list(rows["src"]))).numpy()
        np.testing.assert_allclose(np.stack(rows["target"]), expected, atol=1e-5)
    # Stage 1's stream of the cache: streamed from Parquet, or tokenised once and held in Ray's object store (the
    # stage picks by split_rows against in_memory_rows): the same rows either way.
    assert split_rows(out, "train") == 4 and split_rows(out, "test") == 2
    streams = [sorted((tuple(row["input_ids"]), tuple(np.round(row["target"], 5))) for row in parallel_text_dataset(
        out, Tokens(str(teacher_dir), 16), "train", in_memory).take_all()) for in_memory in (False, True)]
    assert streams[0] == streams[1] and len(streams[0]) == 4
    capsys.readouterr()
    assert teacher_targets(frame, teacher, work / "targets", batch_size=4, actors=1, use_gpu=False) == out
    assert "cached" in capsys.readouterr().out


def test_stage2_draws_each_caption_from_a_random_language():
    from components.models.text import RenderedText
    from components.train.data import BatchSpec, Preprocess, TextConfig

    spec = BatchSpec(image_size=8, text=TextConfig(RenderedText(8), caption_choices=("caption_en", "caption_ja",
                                                                                     "caption_xx")))
    preprocess = Preprocess(spec)
    meta = {"caption": "fallback", "caption_en": "red heart", "caption_ja": "赤いハート", "caption_xx": None}
    drawn = [preprocess._caption(meta) for _ in range(400)]
    assert set(drawn) == {"red heart", "赤いハート"} and 150 < drawn.count("red heart") < 250
    assert preprocess._caption({"caption": "fallback"}) == "fallback"
