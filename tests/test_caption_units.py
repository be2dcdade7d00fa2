"""ClipCap's model and decoding: transformers' beam search against every caption scored by brute force, nucleus
sampling against the model's own distribution, the loss on caption tokens only, and a captioner that memorises its
training captions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from components.caption.model import ClipCap

EOS = 0


def peaked_captioner(seed: int, vocab: int = 5, prefix_length: int = 2) -> ClipCap:
    """A tiny ClipCap whose weights are large enough that its next-token distributions are far from uniform (random
    init's near-ties would make the best caption a matter of rounding)."""
    torch.manual_seed(seed)
    model = ClipCap(clip_dim=8, vocab_size=vocab, prefix_length=prefix_length, mapping="mlp", eos_token_id=EOS,
                    pad_token_id=EOS, decoder_overrides={"n_embd": 16, "n_layer": 2, "n_head": 2})
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.5)
    return model.eval()


@torch.no_grad()
def caption_log_probability(model: ClipCap, embedding: torch.Tensor, tokens: list[int], max_length: int) -> float:
    """log p(tokens, then eos unless max_length was reached | image), by one forward over the whole sequence (no
    cache), from the model's own next-token distributions."""
    if not tokens:  # min_length 1: eos cannot come first
        return -math.inf
    ended = tokens + ([EOS] if len(tokens) < max_length else [])
    prefix = model.prefix(embedding[None])
    embeds = torch.cat([prefix, model.decoder.transformer.wte(torch.tensor([ended]))], dim=1)
    logits = model.decoder(inputs_embeds=embeds).logits[0, model.prefix_length - 1:-1].float()
    return float(logits.log_softmax(dim=-1)[torch.arange(len(ended)), torch.tensor(ended)].sum())


def brute_force_best(model: ClipCap, embedding: torch.Tensor, max_length: int) -> tuple[list[int], float]:
    """The likeliest caption among every sequence of non-eos tokens up to max_length."""
    vocab = model.decoder.config.vocab_size
    candidates = [list(c) for length in range(max_length + 1) for c in itertools.product(range(1, vocab), repeat=length)]
    scores = [caption_log_probability(model, embedding, c, max_length) for c in candidates]
    best = max(range(len(candidates)), key=scores.__getitem__)
    return candidates[best], scores[best]


def test_beam_search_over_every_hypothesis_finds_the_likeliest_caption_greedy_often_misses():
    """transformers' beam search, as ClipCap runs it (prefix embeddings, key/value cache), with a beam wide enough
    to hold every hypothesis, against every caption scored without a cache; greedy is the width-1 beam."""
    vocab, max_length = 5, 3
    greedy_missed = 0
    for seed in range(4):
        model = peaked_captioner(seed, vocab)
        embeddings = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
        exhaustive = model.generate(embeddings, "beam", max_length, beam_width=(vocab - 1) ** max_length,
                                    length_penalty=0.0)
        greedy = model.generate(embeddings, "greedy", max_length)
        assert greedy == model.generate(embeddings, "beam", max_length, beam_width=1)
        for row, embedding in enumerate(embeddings):
            best, best_score = brute_force_best(model, embedding, max_length)
            assert exhaustive[row] == best, (seed, row)
            greedy_missed += caption_log_probability(model, embedding, greedy[row], max_length) < best_score - 1e-4
    assert greedy_missed > 0  # the comparison shows what the beam adds


def test_nucleus_samples_the_top_mass_renormalised_and_degenerates_to_greedy():
    model = peaked_captioner(0, vocab=8)
    embedding = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.decoder(inputs_embeds=model.prefix(embedding)).logits[0, -1].float()
    logits[EOS] = -math.inf  # min_length 1
    probabilities, order = logits.softmax(dim=-1).sort(descending=True)
    kept = int((probabilities.cumsum(dim=0) < 0.8).sum()) + 1  # the smallest set holding 0.8
    assert 1 < kept < 7, probabilities  # a nucleus that both keeps and drops tokens
    expected = dict(zip(order[:kept].tolist(), (probabilities[:kept] / probabilities[:kept].sum()).tolist()))

    draws = model.generate(embedding.expand(3000, -1), "nucleus", max_length=1, top_p=0.8, seed=0)
    firsts = [d[0] for d in draws]
    assert set(firsts) == set(expected)
    for token, share in expected.items():
        assert abs(firsts.count(token) / len(firsts) - share) < 0.03, (token, share)
    assert model.generate(embedding.expand(3000, -1), "nucleus", max_length=1, top_p=0.8, seed=0) == draws
    assert model.generate(embedding.expand(4, -1), "nucleus", 3, top_p=1e-6) == model.generate(
        embedding.expand(4, -1), "greedy", 3)


def test_bad_decoding_settings_are_refused():
    model = peaked_captioner(0)
    embedding = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(embedding, "nucleus", top_p=0)
    with pytest.raises(ValueError, match="beam width"):
        model.generate(embedding, "beam", beam_width=0)
    with pytest.raises(ValueError, match="unknown decoding method"):
        model.generate(embedding, "sampling")


def tiny_captioner(mapping: str, prefix_length: int = 4) -> ClipCap:
    torch.manual_seed(0)
    return ClipCap(clip_dim=16, vocab_size=12, prefix_length=prefix_length, mapping=mapping, eos_token_id=EOS,
                   pad_token_id=EOS, mapping_layers=2)


def test_loss_counts_caption_tokens_only():
    model = tiny_captioner("mlp").eval()
    clip = torch.randn(2, 16)
    ids = torch.tensor([[3, 4, 5, EOS, EOS], [6, 7, EOS, EOS, EOS]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    loss = model(clip, ids, mask)
    other_padding = ids.clone()
    other_padding[0, 4], other_padding[1, 3:] = 9, 11
    assert torch.allclose(model(clip, other_padding, mask), loss)
    # Reference: run the decoder on prefix + tokens, score each real token from the position before it.
    with torch.no_grad():
        total, count = 0.0, 0
        for row in range(2):
            length = int(mask[row].sum())
            embeds = torch.cat([model.prefix(clip[row:row + 1]), model.decoder.transformer.wte(ids[row:row + 1, :length])], 1)
            logits = model.decoder(inputs_embeds=embeds).logits[0].log_softmax(-1)
            for i in range(length):
                total -= float(logits[model.prefix_length - 1 + i, ids[row, i]])
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("prefix_length", [1, 10])
def test_mappings_shape_the_prefix_and_the_transformer_variant_freezes_gpt2(prefix_length):
    mlp, transformer = tiny_captioner("mlp", prefix_length), tiny_captioner("transformer", prefix_length)
    clip = torch.randn(3, 16)
    for model in (mlp, transformer):
        assert model.prefix(clip).shape == (3, prefix_length, model.decoder.config.n_embd)
    assert all(p.requires_grad for p in mlp.decoder.parameters())
    assert not any(p.requires_grad for p in transformer.decoder.parameters())
    assert transformer.constant.requires_grad
    with pytest.raises(ValueError, match="unknown mapping"):
        ClipCap(clip_dim=16, vocab_size=12, mapping="lstm")


def _toy_pairs():
    """(image embeddings, their captions as token lists, padded ids, mask): four toy image-caption pairs."""
    clip = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    captions = [[3, 4, 5], [6, 7], [8, 9, 10], [11]]
    width = max(len(c) for c in captions) + 1
    ids = torch.tensor([c + [EOS] * (width - len(c)) for c in captions])
    mask = torch.tensor([[1] * (len(c) + 1) + [0] * (width - len(c) - 1) for c in captions])
    return clip, captions, ids, mask


def _fit(model: ClipCap, clip, ids, mask, lr: float, steps: int = 150) -> float:
    """`steps` of AdamW on the captioner's trainable parameters; returns the last loss, the model left in eval."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(clip, ids, mask)
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def test_captioner_memorises_its_training_captions():
    model = tiny_captioner("mlp")
    clip, captions, ids, mask = _toy_pairs()
    assert _fit(model, clip, ids, mask, lr=2e-3) < 0.05
    assert model.generate(clip, "greedy", max_length=8) == captions
    assert model.generate(clip, "beam", max_length=8, beam_width=3) == captions


def test_transformer_mapping_steers_a_frozen_language_model_to_each_images_caption():
    """ClipCap's transformer variant: the decoder, fitted to the captions alone as the LM sub-stage leaves it,
    stays frozen; only the mapping learns which caption an image's embedding calls for (deterministic on CPU:
    loss 0.04 after 150 steps, every caption exact with greedy and beam decoding)."""
    model = tiny_captioner("transformer")
    clip, captions, ids, mask = _toy_pairs()
    decoder = model.decoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=5e-3)
    for _ in range(100):
        optimizer.zero_grad()
        decoder(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
    decoder.requires_grad_(False)
    model.eval()
    assert model.generate(clip, "greedy", max_length=8) != captions  # the language model cannot tell them apart
    _fit(model, clip, ids, mask, lr=5e-3)
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert model.generate(clip, "greedy", max_length=8) == captions
    assert model.generate(clip, "beam", max_length=8, beam_width=3) == captions


def test_caption_scores_rank_a_perfect_caption_above_a_wrong_one():
    from components.caption.metrics import caption_scores, exact_match, normalise

    references = {"a": ["Red heart!"], "b": ["grinning face"], "c": ["cat face", "cat"]}
    perfect = caption_scores(references, {"a": "red heart", "b": "Grinning face.", "c": "cat face"})
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["BLEU-2"] == pytest.approx(1.0, abs=1e-6)
    wrong = caption_scores(references, {"a": "grinning face", "b": "red heart", "c": "dog"})
    assert all(perfect[k] > wrong[k] for k in perfect)
    assert exact_match(references, {"a": "red heart", "b": "grinning", "c": "cat"}) == pytest.approx(2 / 3)
    assert normalise("Ça va, l’été!") == "ça va l été" and normalise("赤い・ハート") == "赤い ハート"
    with pytest.raises(ValueError, match="same keys"):
        caption_scores(references, {"a": "x"})


def _random_captions(seed: int, keys: int) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """References (1-3 per key) and two hypotheses per key, 1-6 words from a small vocabulary (so n-grams repeat)."""
    import random

    rng = random.Random(seed)
    words = "red heart face cat dog".split()

    def caption() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))

    references = {f"k{i}": [caption() for _ in range(rng.randint(1, 3))] for i in range(keys)}
    return references, {k: caption() for k in references}, {k: caption() for k in references}


def test_caption_scores_from_per_key_statistics_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from components.caption.metrics import caption_scores

    references, hypotheses, _ = _random_captions(seed=0, keys=200)
    ours = caption_scores(references, hypotheses)
    listed = {k: [h] for k, h in hypotheses.items()}
    bleu, _ = Bleu(4).compute_score(references, listed, verbose=0)
    cider, _ = Cider().compute_score(references, listed)
    assert [ours[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu, rel=1e-12)
    assert ours["BLEU-4"] > 0.01 and ours["CIDEr"] == pytest.approx(cider, rel=1e-12)


def test_paired_bootstrap_gives_the_full_set_difference_and_separates_a_better_captioner():
    from components.caption.metrics import caption_scores, caption_statistics, paired_bootstrap

    references, first, second = _random_captions(seed=1, keys=300)
    # Two random captioners of the same kind: the difference is the full-set one, inside its interval.
    pair = paired_bootstrap(caption_statistics(references, first), caption_statistics(references, second))
    direct = {k: caption_scores(references, first)[k] - caption_scores(references, second)[k] for k in pair}
    for name, result in pair.items():
        assert result["difference"] == pytest.approx(direct[name], abs=1e-12)
        assert result["low"] < result["difference"] < result["high"] and 0 < result["ahead"] < 1, (name, result)
    # Against itself: no difference, and never ahead.
    same = paired_bootstrap(caption_statistics(references, first), caption_statistics(references, first))
    assert all(r == {"difference": 0.0, "low": 0.0, "high": 0.0, "ahead": 0.0} for r in same.values()), same
    # A captioner that gets half the references exactly beats a random one in every resample.
    better = {k: refs[0] if i % 2 else first[k] for i, (k, refs) in enumerate(references.items())}
    ahead = paired_bootstrap(caption_statistics(references, better), caption_statistics(references, first))
    assert all(r["low"] > 0 and r["ahead"] == 1.0 for r in ahead.values()), ahead
    with pytest.raises(ValueError, match="same keys"):
        paired_bootstrap(caption_statistics(references, first),
                         caption_statistics(dict(list(references.items())[:5]), dict(list(first.items())[:5])))


def test_nearest_captions_scan_blocks_like_a_full_search():
    from components.caption.metrics import nearest_captions

    rng = torch.Generator().manual_seed(0)
    candidates = torch.nn.functional.normalize(torch.randn(50, 8, generator=rng), dim=-1).numpy()
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=rng), dim=-1).numpy()
    captions = [f"caption {i}" for i in range(50)]
    blocks = [(candidates[i:i + 16], captions[i:i + 16]) for i in range(0, 50, 16)]
    expected = [captions[i] for i in (queries @ candidates.T).argmax(axis=1)]
    assert nearest_captions(queries, blocks) == expected


def test_captioner_saves_and_loads_bit_for_bit(tmp_path):
    model = tiny_captioner("transformer", prefix_length=3).eval()
    model.save_pretrained(tmp_path)
    loaded = ClipCap.from_pretrained(tmp_path)
    clip = torch.randn(2, 16)
    assert torch.equal(loaded.prefix(clip), model.prefix(clip))
    assert loaded.generate(clip, "greedy", max_length=5) == model.generate(clip, "greedy", max_length=5)
    with pytest.raises(FileNotFoundError, match="not a saved ClipCap"):
        ClipCap.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_cached_rows_read_one_split_of_every_file(ray_session, tmp_path, request, where):
    import pyarrow as pa

    from components import storage
    from components.train.data import cached_rows, split_rows

    root = storage.location(request.getfixturevalue("object_store") if where == "bucket" else tmp_path)
    for part in range(2):
        storage.write_parquet(pa.table({"n": range(part * 5, part * 5 + 5),
                                        "split": ["train", "test"] * 2 + ["train"]}), root / f"part-{part}.parquet")
    rows = cached_rows(root, ["n", "split"], split="train").take_all()
    assert sorted(r["n"] for r in rows) == [0, 2, 4, 5, 7, 9]
    assert split_rows(root, "train") == 6 and split_rows(root, "test") == 4
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        cached_rows(root / "empty", ["n"])


def test_whitening_spreads_crowded_embeddings_and_travels_with_the_captioner(tmp_path):
    from components.caption.model import EmbeddingWhitening

    # A small CLIP's embeddings: one common direction plus tiny, unevenly scaled differences.
    rng = torch.Generator().manual_seed(0)
    crowded = torch.ones(16) + torch.randn(400, 16, generator=rng) * torch.logspace(-4, -1, 16)
    whitening = EmbeddingWhitening.fit(crowded.numpy(), ridge=1e-9)
    white = whitening(crowded)
    assert white.mean(dim=0).abs().max() < 1e-3
    assert torch.allclose(torch.cov(white.T, correction=0), torch.eye(16), atol=2e-2)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        EmbeddingWhitening.fit(crowded.numpy(), ridge=0)

    whitening.save(tmp_path / "whitening.safetensors")
    model = ClipCap(clip_dim=16, vocab_size=12, prefix_length=2, eos_token_id=EOS, pad_token_id=EOS,
                    decoder_overrides={"n_embd": 16, "n_layer": 1, "n_head": 2},
                    whitening=tmp_path / "whitening.safetensors").eval()
    plain = ClipCap(clip_dim=16, vocab_size=12, prefix_length=2, eos_token_id=EOS, pad_token_id=EOS,
                    decoder_overrides={"n_embd": 16, "n_layer": 1, "n_head": 2}).eval()
    plain.load_state_dict(model.state_dict())  # same weights: only the whitening differs
    assert torch.allclose(model.prefix(crowded[:3]), plain.prefix(white[:3]), atol=1e-5)
    # bf16 weights still see the embeddings whitened in float32 (rounding first would erase the small directions)
    assert torch.allclose(model.to(torch.bfloat16).prefix(crowded[:3]).float(),
                          plain.to(torch.bfloat16).prefix(white[:3]).float())
    model.float().save_pretrained(tmp_path / "saved")
    loaded = ClipCap.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.prefix(crowded[:3]), model.prefix(crowded[:3]))
