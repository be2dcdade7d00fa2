"""ClipCap (Mokady et al. 2021): a CLIP image embedding -> a mapping network -> `prefix_length` vectors that a
GPT-2 decoder reads as the start of its input, then writes the caption.

Two mappings, as in the paper:
- "mlp": embedding -> Linear -> tanh -> Linear -> prefix_length x d_model; the decoder is fine-tuned with it.
- "transformer": embedding -> Linear -> clip_length x d_model, concatenated with a learned constant of
  prefix_length vectors, through a transformer encoder; the outputs at the constant's positions are the prefix.
  The decoder stays frozen.

The decoder is a `transformers.GPT2LMHeadModel` from a config (random init, or `pretrained`). The loss is the
decoder's next-token cross-entropy on caption tokens only (not on the prefix, not on padding).

Optionally the CLIP embedding is whitened before the mapping (`EmbeddingWhitening`, fit on the training images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

MAPPINGS = ("mlp", "transformer")
# GPT-2 sizes per preset (n_positions: prefix + caption tokens).
DECODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 64},
    "small": {"n_embd": 384, "n_layer": 6, "n_head": 6, "n_positions": 96},
    "base": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 128},  # GPT-2 (124M)
}


def build_decoder(vocab_size: int, preset: str = "tiny", pretrained: str | None = None,
                  eos_token_id: int | None = None, pad_token_id: int | None = None,
                  overrides: dict[str, Any] | None = None, config: dict[str, Any] | None = None):
    """A GPT2LMHeadModel: `pretrained` (hub name or directory), a saved `config` dict, or a preset (random init)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if pretrained:
        return GPT2LMHeadModel.from_pretrained(pretrained)
    if config is not None:
        return GPT2LMHeadModel(GPT2Config.from_dict(config))
    if preset not in DECODER_PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}: use one of {sorted(DECODER_PRESETS)}")
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
                                      pad_token_id=pad_token_id, **{**DECODER_PRESETS[preset], **(overrides or {})}))


class EmbeddingWhitening:
    """PCA whitening of CLIP image embeddings, fit on the training images. A small CLIP's embeddings crowd into a
    few directions (a test-suite tiny CLIP: 81% of the variance in 2 of 128, nearest neighbours at cosine 0.996),
    and the mapping learns far faster from unit-variance inputs: training captions reproduced exactly after 300
    steps rise from 0.025 to 0.53 (benchmarks/clipcap_whitening.py). Held as float32 tensors outside the module's
    parameters and buffers, so bf16 training never rounds it; saved beside the weights."""

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor):
        self.mean, self.matrix = mean.float(), matrix.float()

    @classmethod
    def fit(cls, embeddings: np.ndarray, ridge: float) -> EmbeddingWhitening:
        """ridge: added to every eigenvalue, relative to the largest (keeps near-empty directions from exploding)."""
        if ridge <= 0:
            raise ValueError(f"whitening ridge must be > 0, got {ridge}")
        data = np.asarray(embeddings, dtype=np.float64)
        mean = data.mean(axis=0)
        values, vectors = np.linalg.eigh(np.cov(data - mean, rowvar=False, bias=True))
        matrix = vectors / np.sqrt(np.clip(values, 0, None) + ridge * values.max())
        return cls(torch.from_numpy(mean), torch.from_numpy(matrix))

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        device = embeddings.device
        return (embeddings.float() - self.mean.to(device)) @ self.matrix.to(device)

    def save(self, file: str | Path) -> None:
        """To a local path or an object-store location."""
        from safetensors.torch import save

        from components import storage

        with storage.atomic_write(file) as out:
            out.write(save({"mean": self.mean.contiguous(), "matrix": self.matrix.contiguous()}))

    @classmethod
    def load(cls, file: str | Path) -> EmbeddingWhitening:
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        return cls(tensors["mean"], tensors["matrix"])


class ClipCap(nn.Module):
    def __init__(self, clip_dim: int, vocab_size: int, prefix_length: int = 10, mapping: str = "mlp",
                 preset: str = "tiny", pretrained: str | None = None, clip_length: int = 10,
                 mapping_layers: int = 8, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 decoder_overrides: dict[str, Any] | None = None, decoder_config: dict[str, Any] | None = None,
                 whitening: str | Path | None = None):
        """pretrained: the decoder's weights (a GPT-2 hub name or directory, e.g. the LM pretraining export);
        decoder_config: a saved decoder config (from_pretrained); else a `preset` decoder, random init.
        whitening: an EmbeddingWhitening file applied to the CLIP embeddings first."""
        super().__init__()
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {mapping!r}: use one of {MAPPINGS}")
        if prefix_length < 1:
            raise ValueError(f"prefix_length must be at least 1, got {prefix_length}")
        self.decoder = build_decoder(vocab_size, preset, pretrained, eos_token_id, pad_token_id, decoder_overrides,
                                     decoder_config)
        self.spec = {"clip_dim": clip_dim, "vocab_size": vocab_size, "prefix_length": prefix_length,
                     "mapping": mapping, "clip_length": clip_length, "mapping_layers": mapping_layers,
                     "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "whitening": bool(whitening)}
        self.whitening = EmbeddingWhitening.load(whitening) if whitening else None
        width = self.decoder.config.n_embd
        self.prefix_length, self.mapping_kind, self.clip_dim = prefix_length, mapping, clip_dim
        self.eos_token_id = self.decoder.config.eos_token_id if eos_token_id is None else eos_token_id
        if mapping == "mlp":
            hidden = width * prefix_length // 2
            self.mapping = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, width * prefix_length))
        else:
            self.clip_length = clip_length
            self.project = nn.Linear(clip_dim, clip_length * width)
            self.constant = nn.Parameter(torch.randn(prefix_length, width))
            layer = nn.TransformerEncoderLayer(width, nhead=8 if width % 8 == 0 else 1, dim_feedforward=2 * width,
                                               batch_first=True, norm_first=True)
            self.mapping = nn.TransformerEncoder(layer, mapping_layers, enable_nested_tensor=False)
            self.decoder.requires_grad_(False)  # ClipCap's transformer variant keeps the language model frozen

    def prefix(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, clip_dim] -> [B, prefix_length, d_model]. Embeddings come in float32: whitening amplifies small
        directions, where bf16 rounding would drown the signal."""
        width = self.decoder.config.n_embd
        batch = clip_embeddings.shape[0]
        features = self.whitening(clip_embeddings) if self.whitening is not None else clip_embeddings
        features = features.to(next(self.mapping.parameters()).dtype)
        if self.mapping_kind == "mlp":
            return self.mapping(features).view(batch, self.prefix_length, width)
        projected = self.project(features).view(batch, self.clip_length, width)
        states = self.mapping(torch.cat([projected, self.constant.expand(batch, -1, -1)], dim=1))
        return states[:, self.clip_length:]

    def forward(self, clip_embeddings: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor:
        """Mean next-token cross-entropy over the caption tokens (input_ids: caption + eos, right-padded)."""
        prefix = self.prefix(clip_embeddings)
        embeds = torch.cat([prefix, self.decoder.transformer.wte(input_ids)], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        logits = self.decoder(inputs_embeds=embeds, attention_mask=mask).logits
        # Position P-1+i predicts caption token i: the last prefix vector predicts the first word.
        predicted = logits[:, self.prefix_length - 1:-1]
        loss = nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]).float(), input_ids.reshape(-1),
                                           reduction="none").view_as(input_ids)
        weights = attention_mask.to(loss.dtype)
        return (loss * weights).sum() / weights.sum().clamp(min=1)

    @torch.no_grad()
    def generate(self, clip_embeddings: torch.Tensor, method: str = "beam", max_length: int = 24,
                 beam_width: int = 5, top_p: float = 0.9, temperature: float = 1.0, min_length: int = 1,
                 length_penalty: float = 1.0, seed: int | None = None) -> list[list[int]]:
        """Caption token ids (without eos) for each image embedding, from transformers' `generate` on the decoder
        with the prefix as `inputs_embeds` (its key/value cache: each step runs the new token only).

        greedy; beam (beam_width hypotheses, ranked by summed log-probability / length**length_penalty, 0 ranking
        by probability); nucleus (sampling from the smallest set of tokens holding top_p of the probability,
        Holtzman et al. 2020, at `temperature`; `seed` makes it repeatable). At most max_length tokens; eos is
        forbidden before min_length (an undertrained decoder's likeliest caption is the empty one)."""
        if method == "greedy":
            settings = {"do_sample": False, "num_beams": 1}
        elif method == "beam":
            if beam_width < 1:
                raise ValueError(f"beam width must be at least 1, got {beam_width}")
            settings = {"do_sample": False, "num_beams": beam_width, "length_penalty": length_penalty}
        elif method == "nucleus":
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p}")
            settings = {"do_sample": True, "top_p": top_p, "top_k": 0, "temperature": temperature}
        else:
            raise ValueError(f"unknown decoding method {method!r}: use greedy, beam or nucleus")
        prefix = self.prefix(clip_embeddings)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            generated = self.decoder.generate(
                inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long,
                                                                device=prefix.device),
                max_new_tokens=max_length, min_new_tokens=min_length, eos_token_id=self.eos_token_id,
                pad_token_id=self.eos_token_id, **settings)
        return [ids[:ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids
                for ids in generated.tolist()]

    # -- persistence: clipcap.json (the spec + the decoder's config) + model.safetensors ------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {**self.spec, "decoder_config": self.decoder.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_model(self, str(directory / WEIGHTS_FILE))
        if self.whitening is not None:
            self.whitening.save(directory / WHITENING_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ClipCap:
        from safetensors.torch import load_model

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a saved ClipCap captioner")
        config = json.loads((directory / CONFIG_FILE).read_text())
        config["whitening"] = directory / WHITENING_FILE if config.get("whitening") else None
        model = cls(**config)
        load_model(model, str(directory / WEIGHTS_FILE), strict=True)
        return model.eval()


def caption_texts(captioner: ClipCap, tokenizer, embeddings: torch.Tensor, batch: int = 64, **settings) -> list[str]:
    """Decoded captions for CLIP image embeddings [N, D]; settings: generate()'s keyword arguments."""
    out = []
    for start in range(0, len(embeddings), batch):
        for ids in captioner.generate(embeddings[start:start + batch], **settings):
            out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


CONFIG_FILE = "clipcap.json"
WEIGHTS_FILE = "model.safetensors"
WHITENING_FILE = "whitening.safetensors"
