"""Model families: FILIP's late interaction against a brute-force loop, exports that reload to the same
embeddings (plain transformers for CLIP), CLIPPO's Unifont rendering, and clear errors on bad configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.models.factory import build_model, load_model, load_model_and_text
from components.models.filip import late_interaction, similarity_pair
from components.models.inference import embed_images, embed_texts
from components.models.tokenizer import train_bpe
from components.models.unifont import render_text

CAPTIONS = ["grinning face", "red apple", "smiling cat with heart eyes", "flag: japan", "a b c d e f g h"]


def brute_force_filip(image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FILIP's symmetric similarity, one (image, text) pair and one token at a time."""
    out = torch.zeros(image.shape[0], text.shape[0], dtype=torch.float64)
    for i in range(image.shape[0]):
        for t in range(text.shape[0]):
            real = [l for l in range(text.shape[1]) if mask[t, l]]
            patch_best = [max(float(image[i, p] @ text[t, l]) for l in real) for p in range(image.shape[1])]
            token_best = [max(float(image[i, p] @ text[t, l]) for p in range(image.shape[1])) for l in real]
            out[i, t] = (sum(patch_best) / len(patch_best) + sum(token_best) / len(token_best)) / 2
    return out


def test_filip_similarity_matches_brute_force_and_ignores_padding():
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=generator, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 7, 8, generator=generator, dtype=torch.float64), dim=-1)
    lengths = torch.tensor([7, 3, 1, 5, 2])
    mask = (torch.arange(7)[None] < lengths[:, None]).to(torch.float64)
    expected = brute_force_filip(image, text, mask)
    # Tiny chunks exercise the chunked path; padding slots hold large values that must not matter.
    noisy = text.clone()
    noisy[mask == 0] = 10.0
    got = late_interaction(image, noisy, mask, max_elements=50)
    assert torch.allclose(got, expected, atol=1e-12)
    s_image, s_text = similarity_pair(image, noisy, mask)
    assert torch.allclose((s_image + s_text) / 2, expected, atol=1e-12)


def _unit_tokens(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def test_filip_token_selection_keeps_each_samples_best_matched_tokens_and_their_mask():
    """FILIP's token selection (paper, 3.1.2) against a loop written from its definition: a patch's score is its
    best similarity to any real token of any text in the local batch, a text token's its best similarity to any
    patch of any image; each sample keeps the ceil(f x length) best, texts keep their mask, padding never wins."""
    from components.models.filip import FILIP

    image, text = _unit_tokens(3, 8, 4, seed=1), _unit_tokens(4, 6, 4, seed=2)
    lengths = torch.tensor([6, 2, 4, 1])
    mask = (torch.arange(6)[None] < lengths[:, None]).to(torch.float64)
    text[mask == 0] = 10.0  # padding slots that would win every comparison: only the mask keeps them out
    model = FILIP.__new__(FILIP)  # select_tokens reads only its fraction
    model.token_topk_fraction = 0.25
    (kept_patches,), (kept_tokens, kept_mask) = model.select_tokens((image,), (text, mask))
    assert kept_patches.shape == (3, 2, 4) and kept_tokens.shape == kept_mask.shape[:2] + (4,) == (4, 2, 4)

    real = [(t, l) for t in range(4) for l in range(6) if mask[t, l]]
    for i in range(3):
        scores = [max(float(image[i, p] @ text[t, l]) for t, l in real) for p in range(8)]
        best = sorted(range(8), key=lambda p: -scores[p])[:2]
        assert sorted(map(tuple, kept_patches[i].tolist())) == sorted(map(tuple, image[i, best].tolist()))
    for t in range(4):
        scores = [max(float(image[i, p] @ text[t, l]) for i in range(3) for p in range(8)) if mask[t, l]
                  else float("-inf") for l in range(6)]
        best = sorted(range(6), key=lambda l: -scores[l])[:2]
        assert sorted(map(tuple, kept_tokens[t].tolist())) == sorted(map(tuple, text[t, best].tolist()))
        assert sorted(kept_mask[t].tolist()) == sorted(mask[t, best].tolist())
    assert kept_mask[3].tolist() == [1.0, 0.0]  # a one-token text keeps its token first; its other slot is padding

    # Gradients reach the kept tokens only; without a fraction nothing is dropped.
    leaf = image.clone().requires_grad_()
    (selected,), _ = model.select_tokens((leaf,), (text, mask))
    selected.sum().backward()
    assert int((leaf.grad.abs().sum(-1) > 0).sum()) == 3 * 2
    model.token_topk_fraction = None
    assert model.select_tokens((image,), (text, mask)) == ((image,), (text, mask))


def test_prompt_ensembles_average_embeddings_for_dual_encoders_and_similarities_for_filip():
    """Zero-shot with several templates per class (class-major prompts): CLIP's ensemble is the renormalised mean of
    each class's normalised prompt embeddings; FILIP's is the mean token-wise similarity over a class's prompts
    (token features cannot be averaged)."""
    from components.models.clip import CLIP
    from components.models.filip import FILIP

    classes, templates = 3, 4
    images = _unit_tokens(5, 16, seed=3)
    prompts = _unit_tokens(classes * templates, 16, seed=4)
    clip = CLIP.__new__(CLIP)
    got = clip.class_scores((images,), (prompts,), templates)
    for c in range(classes):
        mean = prompts[c * templates:(c + 1) * templates].mean(dim=0)
        assert torch.allclose(got[:, c], images @ (mean / mean.norm()), atol=1e-12)

    patches, tokens = _unit_tokens(5, 6, 8, seed=5), _unit_tokens(classes * templates, 7, 8, seed=6)
    mask = (torch.arange(7)[None] < torch.randint(1, 8, (classes * templates, 1))).to(torch.float64)
    got = FILIP.__new__(FILIP).class_scores((patches,), (tokens * mask[..., None], mask), templates)
    expected = brute_force_filip(patches, tokens, mask).reshape(5, classes, templates).mean(dim=-1)
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS * 20, vocab_size=300, min_frequency=1)


def _images(count: int, size: int = 64) -> list[bytes]:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _build(family: str, tokenizer, **settings):
    kwargs = settings if family == "clippo" else {**settings,
        "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    return build_model(family, "tiny", image_size=64, **kwargs).eval()


@pytest.mark.parametrize("family", ["clip", "filip", "clippo"])
def test_export_reloads_to_the_same_embeddings(family, tokenizer, tmp_path):
    model = _build(family, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, text = load_model_and_text(tmp_path)  # the export's own tokenizer, or Unifont for CLIPPO
    assert type(loaded) is type(model)
    images = _images(3)
    assert np.allclose(embed_images(model, images), embed_images(loaded, images), atol=1e-6)
    reloaded = embed_texts(loaded, text, CAPTIONS)
    assert np.allclose(embed_texts(model, model.text_processor(tokenizer), CAPTIONS), reloaded, atol=1e-6)
    assert np.allclose(np.linalg.norm(reloaded, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("family", ["clip", "filip", "clippo"])
def test_siglip_bias_trains_and_survives_export(family, tokenizer, tmp_path):
    from components.train.losses import ContrastiveLoss

    model = _build(family, tokenizer)
    assert model(*_tiny_inputs(model, tokenizer))[3] is None  # InfoNCE models carry no bias
    model.add_logit_bias(-10.0)
    image, text, scale, bias = model(*_tiny_inputs(model, tokenizer))
    ContrastiveLoss("siglip")(image, text, model.similarity, scale, bias).backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert float(loaded.logit_bias) == -7.25
    assert float(loaded.logit_scale) == pytest.approx(float(model.logit_scale))


@pytest.mark.parametrize("family", ["clip", "filip", "clippo"])
def test_the_initial_temperature_is_a_setting_and_the_scale_stays_learnable(family, tokenizer):
    default = _build(family, tokenizer)
    assert float(default.logit_scale.exp()) == pytest.approx(1 / 0.07)  # CLIP's
    hotter = _build(family, tokenizer, temperature_init=0.02)
    assert float(hotter.logit_scale.exp()) == pytest.approx(50.0) and hotter.logit_scale.requires_grad
    siglip = _build(family, tokenizer, logit_bias=-10.0, temperature_init=0.05)  # the setting wins over SigLIP's 10
    assert float(siglip.logit_scale.exp()) == pytest.approx(20.0)
    for bad in (0.001, 2.0, "hot", True):
        with pytest.raises(ValueError, match="model.temperature_init=.*: use a temperature in \\[0.01, 1\\]"):
            _build(family, tokenizer, temperature_init=bad)


def _tiny_inputs(model, tokenizer):
    return torch.randn(4, 3, model.image_size, model.image_size), \
        model.text_batch(model.text_processor(tokenizer).tensors(CAPTIONS[:4]))


@pytest.mark.parametrize("family", ["clip", "filip"])
def test_training_cuts_trailing_padding_without_changing_the_features(family, tokenizer):
    """Captions are padded to the model's length in the data pipeline; a training step runs only the columns
    some caption uses, which changes no text feature of CLIP. FILIP keeps the padded length: its token
    selection counts slots of it."""
    from components.train.tasks import model_inputs

    model = _build(family, tokenizer)
    padded = model.text_processor(tokenizer).tensors(CAPTIONS[:4])
    _, text = model_inputs(model, {"pixels": torch.zeros(4, 64, 64, 3, dtype=torch.uint8), **padded}, torch.float32)
    longest = int(padded["attention_mask"].sum(dim=1).max())
    assert padded["input_ids"].shape[1] == model.max_text_length > longest
    assert text["input_ids"].shape[1] == (model.max_text_length if family == "filip" else longest)
    assert torch.equal(text["input_ids"], padded["input_ids"][:, :text["input_ids"].shape[1]])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(text)[0], model.encode_text(padded)[0], atol=1e-5)


def test_a_checkpoint_in_openais_layout_pools_at_its_end_token_and_brings_its_tokenizer(tmp_path):
    """OpenAI's and LAION's transformers CLIPs carry the legacy eos_token_id 2 (transformers then pools at the
    largest id, <|endoftext|>) and placeholder pad/bos ids: they build with their own tokenizer, embed text as
    transformers does, and a tokenizer whose end token is another id is refused."""
    from transformers import CLIPModel

    from components.models.tokenizer import has_tokenizer, load_tokenizer
    from tests.helpers import save_openai_layout_clip

    checkpoint = save_openai_layout_clip(tmp_path / "openai", CAPTIONS * 20)
    assert has_tokenizer(checkpoint) and not has_tokenizer(tmp_path)
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == len(tokenizer) - 1
    model = build_model("clip", pretrained=str(checkpoint), vocab_size=len(tokenizer),
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    assert model.model.config.text_config.eos_token_id == 2 and model.eos_token_id == len(tokenizer) - 1
    assert model.max_text_length == 77 and model.image_size == 64
    reference = CLIPModel.from_pretrained(checkpoint).eval()
    encoded = tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = reference.get_text_features(**encoded)
        expected = getattr(expected, "pooler_output", expected)
    got = embed_texts(model, model.text_processor(tokenizer), CAPTIONS)
    assert np.allclose(got, torch.nn.functional.normalize(expected, dim=-1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=rf"eos_token_id=3 \(pretrained has {len(tokenizer) - 1}\)"):
        build_model("clip", pretrained=str(checkpoint), vocab_size=len(tokenizer), eos_token_id=3)


def test_filip_and_clippo_start_from_the_towers_of_a_checkpoint_in_openais_layout(tmp_path):
    """model.pretrained=<a transformers CLIP> for FILIP (both towers; token projections start random) and CLIPPO
    (the image tower and its projection, which also read rendered text): the weights are the checkpoint's."""
    from transformers import CLIPModel

    from components.models.tokenizer import load_tokenizer
    from tests.helpers import save_openai_layout_clip

    checkpoint = save_openai_layout_clip(tmp_path / "openai", CAPTIONS * 20)
    clip = CLIPModel.from_pretrained(checkpoint)
    tokenizer = load_tokenizer(checkpoint)

    def same(ours: torch.nn.Module, theirs: torch.nn.Module) -> bool:
        return all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                                                      strict=True))

    filip = build_model("filip", pretrained=str(checkpoint))
    assert same(filip.vision, clip.vision_model) and same(filip.text, clip.text_model)
    assert torch.equal(filip.logit_scale, clip.logit_scale)
    # its tokenizer's ids, pooled
    assert embed_texts(filip, filip.text_processor(tokenizer), CAPTIONS).shape == (len(CAPTIONS), 256)
    clippo = build_model("clippo", pretrained=str(checkpoint))
    assert same(clippo.vision, clip.vision_model) and same(clippo.projection, clip.visual_projection)
    assert torch.equal(clippo.logit_scale, clip.logit_scale)


def test_clip_export_loads_with_plain_transformers(tokenizer, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    model = _build("clip", tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    plain = CLIPModel.from_pretrained(tmp_path).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    encoded = plain_tokenizer(CAPTIONS, padding="max_length", max_length=model.max_text_length, return_tensors="pt")
    with torch.no_grad():
        features = plain.get_text_features(**encoded)
        if not isinstance(features, torch.Tensor):  # transformers 5 returns an output whose pooler is projected
            features = features.pooler_output
        plain_text = torch.nn.functional.normalize(features, dim=-1).numpy()
    assert np.allclose(plain_text, embed_texts(model, model.text_processor(tokenizer), CAPTIONS), atol=1e-5)


def test_unifont_rendering_draws_text_and_wraps():
    images = render_text(["hello", "", "x" * 200], image_size=64)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert (images[1] == 255).all()  # empty caption: blank
    ink = images[0, :, :, 0] < 128
    assert ink[:16].any() and not ink[16:].any()  # one line of 16 px glyphs
    assert (images[2, 48:, :, 0] < 128).any()  # a long caption wraps down to the last line


def test_clippo_patches_cover_a_unifont_line_unless_overridden():
    # The tiny preset's 8 px patches would cut each 16 px line of rendered text in two (BENCHMARKS.md).
    assert build_model("clippo", "tiny").vision.config.patch_size == 16
    assert build_model("clippo", "tiny", patch_size=8).vision.config.patch_size == 8
    assert build_model("clippo", "small").vision.config.patch_size == 16


def test_bad_model_configs_fail_with_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown model family"):
        build_model("clap")
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("clip", "huge")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_model("clip", "tiny", image_size=60)
    with pytest.raises(ValueError, match="unknown model override"):
        build_model("clip", "tiny", hidden_sise=64)
