"""What a training run's data workers produce, without Ray: the order in which it reads its shard files, and
CLIPPO's text/text pairs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from upath import UPath

from components.train.data import pass_order


def test_each_pass_reads_every_file_once_in_its_own_order():
    paths = [UPath(f"shards/{i:05d}.tar") for i in range(6)]
    order = pass_order(paths, passes=8, seed=3)
    passes = [order[i:i + len(paths)] for i in range(0, len(order), len(paths))]
    assert len(passes) == 8 and all(sorted(p, key=str) == paths for p in passes)
    assert len({tuple(map(str, p)) for p in passes}) > 1  # not one order repeated
    assert pass_order(paths, passes=8, seed=3) == order  # a seed gives its order back
    assert pass_order(paths, passes=8, seed=4) != order
    assert sorted(pass_order(paths, passes=1, seed=0), key=str) == paths


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_clippo_text_pairs_replace_that_share_of_images_with_a_rendered_translation(small_corpus, fraction):
    """model.text_pair_fraction, as a pretraining run configures its data workers: each example's image is, with
    that probability, one of its caption's translations (data.caption_columns) rendered like the caption."""
    from components.data.emoji_corpus import load_corpus
    from components.models.factory import build_model
    from components.models.text import RenderedText
    from components.models.unifont import render_text
    from components.stages.wiring import stage_config
    from components.train.data import BatchSpec, Preprocess
    from components.train.pretraining import model_spec, text_config

    cfg = stage_config("pretrain_clip", ["model=clippo", f"model.text_pair_fraction={fraction}"])
    model = build_model(**model_spec(cfg, None))
    text = text_config(cfg, model.text_processor(None))
    assert isinstance(text.processor, RenderedText) and text.text_pair_fraction == fraction
    assert "caption_ja" in text.pair_columns
    rows = load_corpus(small_corpus).to_dict("records")
    batch = {"image": np.array([(small_corpus / r["image_path"]).read_bytes() for r in rows], dtype=object),
             "meta": np.array([json.dumps(r) for r in rows], dtype=object)}
    out = Preprocess(BatchSpec(model.image_size, text, augment=None))(batch)

    size, font = model.image_size, text.processor.font_size
    pairs = 0
    for i, row in enumerate(rows):
        assert np.array_equal(out["text_pixels"][i], render_text([row["caption"]], size, font)[0])
        with Image.open(io.BytesIO(batch["image"][i])) as image:
            drawing = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
        translations = [render_text([row[c]], size, font)[0] for c in text.pair_columns
                        if row.get(c) and row[c] != row["caption"]]
        is_pair = any(np.array_equal(out["pixels"][i], t) for t in translations)
        assert is_pair or np.array_equal(out["pixels"][i], drawing), row["caption"]
        pairs += is_pair
    # 80 examples: a binomial count with standard deviation 4.5 at one half
    assert pairs == 0 if fraction == 0 else 0.25 * len(rows) < pairs < 0.75 * len(rows)
