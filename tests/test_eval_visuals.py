"""Evaluation visuals: the figures (confusion matrix, retrieval grids, per-language bars, alignment maps),
the typographic attack, and token/patch embeddings with the alignment maps built on them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from components.eval import plots
from components.eval.alignment import alignment_maps, text_special_ids, token_strings
from components.eval.typographic import attack_image, wrong_labels
from components.models.base import ContrastiveModel
from components.models.factory import build_model
from components.models.tokenizer import train_bpe

CAPTIONS = ["grinning face", "red apple", "smiling cat with heart eyes", "flag: japan"]
GRID = 8  # tiny preset at image_size 64: 8x8 patches of 8 pixels


def _png(color, size=(80, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _count(pixels: np.ndarray, rgb, tolerance: int = 40) -> int:
    """Pixels within `tolerance` of `rgb` on every channel."""
    return int((np.abs(pixels - np.array(rgb)) <= tolerance).all(axis=-1).sum())


# -- plots ----------------------------------------------------------------------------------------------------
def test_confusion_matrix_plot_draws_and_keeps_only_the_most_frequent_classes():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 10, (5, 5)) + 40 * np.eye(5, dtype=np.int64)
    image = plots.confusion_matrix_plot(small, [f"class {i}" for i in range(5)])
    assert isinstance(image, Image.Image) and image.width > 200 and image.height > 200
    assert len(np.unique(_pixels(image).reshape(-1, 3), axis=0)) > 10  # a drawn chart, not a blank canvas

    big = rng.integers(0, 5, (60, 60))
    names = [f"c{i}" for i in range(60)]
    truncated = plots.confusion_matrix_plot(big, names, max_classes=40)
    full = plots.confusion_matrix_plot(big, names, max_classes=80)
    assert truncated.width < full.width and truncated.height < full.height  # 40 rows/columns drawn, not 60
    with pytest.raises(ValueError, match="square"):
        plots.confusion_matrix_plot(np.zeros((3, 4), int), ["a", "b", "c"])


def test_retrieval_grid_colours_results_by_correctness():
    queries = [(_png("blue"), "a blue square"), (_png("gray", (40, 120)), "a grey bar")]
    results = [[("a blue square", True), ("a red square", False)], [("a grey bar", True), ("sky", False), ("x", False)]]
    grid = plots.retrieval_grid(queries, results)
    assert grid.width > plots.THUMBNAIL and grid.height >= 2 * plots.THUMBNAIL
    pixels = _pixels(grid)
    assert _count(pixels, plots.CORRECT) > 20 and _count(pixels, plots.WRONG) > 20

    all_correct = plots.retrieval_grid(queries[:1], [[("a blue square", True)]])
    assert _count(_pixels(all_correct), plots.WRONG) == 0 and all_correct.height < grid.height
    with pytest.raises(ValueError):
        plots.retrieval_grid(queries, results[:1])


def test_text_query_grid_frames_images_green_or_red():
    grid = plots.text_query_grid(["a blue square", "a grey bar " * 20],
                                 [[(_png("blue"), True), (_png("gray"), False)], [(_png("gray"), True)]])
    pixels = _pixels(grid)
    assert grid.height >= 2 * plots.THUMBNAIL and grid.width > 2 * plots.THUMBNAIL
    # Frame area per image: (96 + 8)^2 - 96^2 = 1600 pixels at least.
    assert _count(pixels, plots.CORRECT, 0) >= 2 * 1600 and _count(pixels, plots.WRONG, 0) >= 1600


def test_language_bar_chart_and_alignment_figure_draw_one_panel_each():
    few = plots.language_bar_chart({"en": 0.8, "de": 0.6}, "image_to_text_R1")
    many = plots.language_bar_chart({f"l{i}": i / 20 for i in range(20)}, "image_to_text_R1")
    assert few.height > 100 and few.width > 100 and many.width > few.width
    assert len(np.unique(_pixels(few).reshape(-1, 3), axis=0)) > 10

    maps = np.random.default_rng(0).random((5, GRID, GRID))
    one = plots.alignment_map_figure(_png("gray", (64, 64)), ["red"], maps[:1])
    five = plots.alignment_map_figure(_png("gray", (64, 64)), ["a", "red", "apple", "on", "grass"], maps)
    assert one.width > 100 and five.width > one.width
    # The overlay colours a grey picture: the heat-map panel holds pixels far from grey.
    assert (np.abs(_pixels(one) - 128).max(axis=-1) > 60).sum() > 500
    with pytest.raises(ValueError, match="one"):
        plots.alignment_map_figure(_png("gray"), ["a", "b"], maps)


# -- typographic attack ---------------------------------------------------------------------------------------
def _attack_input(size=(128, 96)) -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(80, 180, (size[1], size[0], 3), dtype=np.uint8)  # mid-tones: neither black nor white
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def test_attack_image_writes_dark_text_on_a_white_box_in_the_lower_part():
    original = _attack_input()
    attacked = Image.open(io.BytesIO(attack_image(original, "ipod")))
    assert attacked.size == (128, 96)
    before, after = _pixels(Image.open(io.BytesIO(original))), _pixels(attacked)
    changed = (before != after).any(axis=-1)
    assert changed.sum() > 200
    assert changed[48:].sum() / changed.sum() > 0.95  # the lower half holds the text
    written = after[changed]
    assert (written.max(axis=-1) < 60).sum() > 20  # black glyph ink
    assert (written.min(axis=-1) > 240).sum() > 200  # the white box around it


def test_attack_image_wraps_long_text_and_keeps_the_size():
    original = _attack_input((200, 160))
    short = _pixels(Image.open(io.BytesIO(attack_image(original, "apple"))))
    long = Image.open(io.BytesIO(attack_image(original, "granny smith apple on a wooden table")))
    assert long.size == (200, 160)
    before = _pixels(Image.open(io.BytesIO(original)))
    rows_short = np.flatnonzero((short != before).any(axis=(1, 2)))
    rows_long = np.flatnonzero((_pixels(long) != before).any(axis=(1, 2)))
    assert rows_long.min() < rows_short.min() - 10  # more lines: a taller box
    assert rows_long.min() >= 80  # still only the lower half


def test_wrong_labels_never_the_true_label_and_deterministic():
    labels = np.random.default_rng(1).integers(0, 5, 2000)
    wrong = wrong_labels(labels, 5, seed=3)
    assert wrong.shape == labels.shape and not (wrong == labels).any()
    assert ((wrong >= 0) & (wrong < 5)).all()
    assert np.array_equal(wrong, wrong_labels(labels, 5, seed=3))
    assert not np.array_equal(wrong, wrong_labels(labels, 5, seed=4))
    # Every other class is used, about equally: 2000 samples, 4 choices each.
    for label in range(5):
        counts = np.bincount(wrong[labels == label], minlength=5)
        assert counts[label] == 0 and (np.delete(counts, label) > 0.15 * (labels == label).sum()).all()
    assert (wrong_labels(np.array([0, 1, 0]), 2, seed=0) == [1, 0, 1]).all()
    with pytest.raises(ValueError):
        wrong_labels(np.array([0, 0]), 1, seed=0)


# -- token / patch embeddings ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS * 20, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def models(tokenizer):
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    built = {}
    for family in ("clip", "filip"):
        torch.manual_seed(0)
        built[family] = build_model(family, "tiny", image_size=64, **ids).eval()
    built["clippo"] = build_model("clippo", "tiny", image_size=64).eval()
    return built


def _text(tokenizer, captions, length=12):
    encoded = tokenizer(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.mark.parametrize("family", ["clip", "filip"])
def test_token_embeddings_shapes_and_unit_norms(family, models, tokenizer):
    model = models[family]
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = _text(tokenizer, CAPTIONS[:2])
    with torch.no_grad():
        patches, tokens, mask = model.token_embeddings(pixels, batch)
    dim = patches.shape[-1]
    assert patches.shape == (2, GRID * GRID, dim) and tokens.shape == (2, 12, dim) and mask.shape == (2, 12)
    assert torch.equal(mask, batch["attention_mask"].to(mask.dtype))
    assert torch.allclose(patches.norm(dim=-1), torch.ones(2, GRID * GRID), atol=1e-5)
    assert torch.allclose(tokens.norm(dim=-1), mask, atol=1e-5)  # unit where real, zero where padded


def test_clip_token_embedding_at_eos_is_the_pooled_text_embedding(models, tokenizer):
    model = models["clip"]
    batch = _text(tokenizer, CAPTIONS)
    with torch.no_grad():
        _, tokens, _ = model.token_embeddings(torch.zeros(len(CAPTIONS), 3, 64, 64), batch)
        pooled = model.embed_text(batch)
    eos = (batch["input_ids"] == tokenizer.eos_token_id).int().argmax(dim=-1)
    at_eos = tokens[torch.arange(len(CAPTIONS)), eos]
    assert torch.allclose(at_eos, pooled, atol=1e-5)
    assert not torch.allclose(tokens[:, 1], pooled, atol=1e-2)  # another position would not do


def test_filip_token_embeddings_are_its_features(models, tokenizer):
    model = models["filip"]
    pixels, batch = torch.randn(2, 3, 64, 64), _text(tokenizer, CAPTIONS[:2])
    with torch.no_grad():
        patches, tokens, mask = model.token_embeddings(pixels, batch)
        (image,), (text, text_mask) = model.encode_image(pixels), model.encode_text(batch)
    assert torch.equal(patches, image) and torch.equal(tokens, text) and torch.equal(mask, text_mask)


def test_clippo_has_no_token_embeddings(models):
    model = models["clippo"]
    pixels = torch.zeros(1, 3, 64, 64)
    with pytest.raises(NotImplementedError, match="clippo does not expose token-level embeddings"):
        model.token_embeddings(pixels, {"text_pixels": pixels})


# -- alignment maps -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "filip"])
def test_alignment_maps_one_normalised_map_per_real_word_token(family, models, tokenizer):
    batch = _text(tokenizer, ["red apple"])
    indices, maps = alignment_maps(models[family], torch.randn(1, 3, 64, 64), batch, grid=GRID)
    ids = batch["input_ids"][0]
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    expected = [i for i in range(len(ids)) if batch["attention_mask"][0, i] and int(ids[i]) not in specials]
    assert text_special_ids(models[family]) == specials
    assert indices.tolist() == expected and len(expected) >= 2
    assert maps.shape == (len(expected), GRID, GRID)
    assert (maps >= 0).all() and (maps <= 1).all()
    assert np.allclose(maps.reshape(len(expected), -1).max(axis=1), 1)  # min-max normalised per token
    assert np.allclose(maps.reshape(len(expected), -1).min(axis=1), 0)
    assert "".join(token_strings(tokenizer, ids[indices], None)) == "redapple"


class _FixedEmbeddings(ContrastiveModel):
    """Four patches on a 2x2 grid (one-hot vectors) and a caption bos, A, B, eos whose word tokens each
    match exactly one patch."""

    family = "fixed"

    # Alignment maps read token_embeddings only.
    def encode_image(self, pixel_values):
        raise AssertionError("alignment maps called encode_image")

    def encode_text(self, batch):
        raise AssertionError("alignment maps called encode_text")

    def similarity(self, image, text):
        raise AssertionError("alignment maps called similarity")

    def token_embeddings(self, pixel_values, batch):
        patches = torch.eye(4)[None]  # patch p = e_p; row-major: p = row * 2 + column
        tokens = torch.stack([torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[2], torch.eye(4)[3]])[None]
        return patches, tokens, torch.ones(1, 4)


def test_alignment_maps_put_each_token_on_its_patch_in_grid_order():
    batch = {"input_ids": torch.tensor([[1, 10, 11, 3]])}
    indices, maps = alignment_maps(_FixedEmbeddings(), torch.zeros(1, 3, 2, 2), batch, grid=2,
                                   special_token_ids={1, 3})
    assert indices.tolist() == [1, 2]
    assert np.array_equal(maps[0], [[0, 1], [0, 0]])  # token A is patch 1: row 0, column 1
    assert np.array_equal(maps[1], [[0, 0], [1, 0]])  # token B is patch 2: row 1, column 0
    with pytest.raises(ValueError, match="grid"):
        alignment_maps(_FixedEmbeddings(), torch.zeros(1, 3, 2, 2), batch, grid=3, special_token_ids={1, 3})


def test_token_strings_strip_the_byte_level_space_marker(tokenizer):
    batch = _text(tokenizer, ["red apple"])
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    assert any("Ġ" in token for token in tokenizer.convert_ids_to_tokens(ids.tolist()))
    pieces = token_strings(tokenizer, ids, mask)
    assert len(pieces) == int(mask.sum())  # padding left out
    assert pieces[0] == tokenizer.bos_token and pieces[-1] == tokenizer.eos_token
    assert "".join(pieces[1:-1]) == "redapple" and not any("Ġ" in piece for piece in pieces)
