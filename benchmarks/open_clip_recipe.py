"""open_clip's CLIP recipe on a corpus file, for benchmarks/versus_open_clip.py. Runs in that benchmark's own
virtual environment (torch 2.14.1, torchvision, open_clip_torch), never beside clipforge: it imports nothing of
ours, and the benchmark scores what it writes with our evaluation code.

    <venv>/bin/python benchmarks/open_clip_recipe.py --corpus corpus.npz --out embeddings.npz --seed 0

What it takes from open_clip, as open_clip_train's main loop does (src/open_clip_train/main.py and train.py):
`open_clip.model.CLIP` built from a vision/text config, its 49k-token SimpleTokenizer (context 77), its
`image_transform` (RandomResizedCrop, bicubic, OpenAI mean/std), `ClipLoss`, AdamW with open_clip's defaults for
ViTs (betas 0.9/0.98, eps 1e-6, weight decay 0.2 on weights only), `cosine_lr` with linear warmup, no gradient
clipping, and the logit scale clamped to ln(100) after every step. Batches are drawn from a fresh permutation of the
training rows every epoch. The towers are sized like clipforge's `tiny` preset (the benchmark passes the sizes).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import open_clip
import torch
from open_clip_train.scheduler import cosine_lr
from PIL import Image


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    vision = open_clip.model.CLIPVisionCfg(layers=args.layers, width=args.width, head_width=args.width // args.heads,
                                           patch_size=args.patch_size, image_size=args.image_size)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=args.width, heads=args.heads,
                                       layers=args.layers)
    return open_clip.model.CLIP(embed_dim=args.embed_dim, vision_cfg=vision, text_cfg=text, output_dict=True)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip_train/main.py: no weight decay on gains, biases, norms and the logit scale."""
    def exclude(name, p):
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


@torch.no_grad()
def embed(model, transform, tokenizer, pixels: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    images = torch.cat([model.encode_image(torch.stack([transform(Image.fromarray(p)) for p in pixels[i:i + 256]]),
                                           normalize=True) for i in range(0, len(pixels), 256)])
    text = torch.cat([model.encode_text(tokenizer(texts[i:i + 256]), normalize=True)
                      for i in range(0, len(texts), 256)])
    return images.numpy(), text.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="npz from versus_open_clip.py: pixels, train mask, texts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=64_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.2)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.8, 1.0))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = np.load(args.corpus)
    pixels, train = corpus["pixels"], np.flatnonzero(corpus["train"])
    captions = json.loads(str(corpus["captions"]))
    model = build_model(args)
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    train_transform = open_clip.image_transform(args.image_size, is_train=True,
                                                aug_cfg={"scale": tuple(args.crop_scale)})
    eval_transform = open_clip.image_transform(args.image_size, is_train=False)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    steps = args.samples // args.batch
    schedule = cosine_lr(optimizer, args.lr, int(args.warmup_fraction * steps), steps)
    tokens = tokenizer([captions[i] for i in range(len(captions))])
    rng = np.random.default_rng(args.seed)
    order, position, start = rng.permutation(train), 0, time.time()
    for step in range(steps):
        if position + args.batch > len(order):
            order, position = rng.permutation(train), 0
        index = order[position:position + args.batch]
        position += args.batch
        schedule(step)
        model.train()
        images = torch.stack([train_transform(Image.fromarray(pixels[i])) for i in index])
        out = model(images, tokens[index])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"[open_clip] step {step + 1}/{steps}  loss {loss.item():.4f}  "
                  f"{(step + 1) * args.batch / (time.time() - start):.0f} samples/s", flush=True)
    texts = json.loads(str(corpus["texts"]))
    images, text = embed(model, eval_transform, tokenizer, pixels, texts)
    np.savez(args.out, images=images, texts=text, train_seconds=time.time() - start)


if __name__ == "__main__":
    main()
