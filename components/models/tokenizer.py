"""Text tokenizers: a byte-level BPE trained here on the training captions, or any Hugging Face tokenizer.

The trained tokenizer is saved in transformers' format beside the model, so `AutoTokenizer.from_pretrained(dir)`
(and `CLIPModel` users) load it without this package.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from upath import UPath

from components import storage

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
# Special-token order fixes their ids: pad 0, bos 1, unk 2, eos 3. EOS must not be 2: transformers' CLIP text
# model treats eos_token_id == 2 as "legacy" and pools at the largest token id instead of at EOS.
SPECIAL_TOKENS = [PAD, BOS, UNK, EOS]
# XLM-R's layout (AltCLIP's multilingual text tower): <s> 0, <pad> 1, </s> 2, <unk> 3; the first token is pooled.
XLMR_BOS, XLMR_PAD, XLMR_EOS, XLMR_UNK = "<s>", "<pad>", "</s>", "<unk>"
LAYOUTS = {"clip": (BOS, EOS, PAD, UNK, SPECIAL_TOKENS),
           "xlmr": (XLMR_BOS, XLMR_EOS, XLMR_PAD, XLMR_UNK, [XLMR_BOS, XLMR_PAD, XLMR_EOS, XLMR_UNK])}


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
              layout: str = "clip") -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2/CLIP) trained on `texts`; lower-cased like CLIP's; BOS text EOS.
    layout: the special tokens' names and ids, "clip" (ours) or "xlmr" (XLM-R's, for AltCLIP's text tower).
    Byte-level merges need no per-script rules, so one tokenizer covers every language of a parallel corpus."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tokenizer layout {layout!r}: use one of {sorted(LAYOUTS)}")
    bos, eos, pad, unk, specials = LAYOUTS[layout]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((t for t in texts if t), trainer=trainer)
    bos_id, eos_id = tokenizer.token_to_id(bos), tokenizer.token_to_id(eos)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk)


def captions_from_shards(shards: str | os.PathLike, limit: int = 1_000_000, column: str = "caption",
                         where: dict | None = None) -> Iterator[str]:
    """Stream up to `limit` captions of a shard set (components/data/shard_sets.py: the Parquet companions'
    few columns where present, never a whole dataset); `where` keeps only rows whose columns equal the given
    values (e.g. {"split": "train"})."""
    from components.data.shard_sets import captions

    return itertools.islice(captions(shards, column, where), limit)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def has_tokenizer(name_or_path: str | os.PathLike) -> bool:
    """Whether a model directory (local or in an object store) holds a tokenizer; a hub name is taken to."""
    location = storage.location(name_or_path)
    if storage.is_remote(name_or_path) or location.exists():
        return any((location / name).is_file() for name in TOKENIZER_FILES)
    return True


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """Any tokenizer transformers can load: a local directory, a hub name where a hub is reachable, or a
    directory in an object store (downloaded first)."""
    if storage.is_remote(name_or_path):
        with storage.local_copy(name_or_path) as local:
            return load_tokenizer(local)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_tokenizer(given: str | os.PathLike | None, texts: Callable[[], Iterable[str]], out_dir: UPath,
                      vocab_size: int, layout: str = "clip") -> PreTrainedTokenizerFast:
    """A stage's tokenizer: `given` (any transformers tokenizer) when set, else a byte-level BPE trained on
    `texts()` (called only then); saved to `out_dir` (local or an object store), which the data workers and the
    export read."""
    if given:
        tokenizer = load_tokenizer(given)
    else:
        tokenizer = train_bpe(texts(), vocab_size=vocab_size, layout=layout)
    with storage.staged_directory(out_dir) as local:
        tokenizer.save_pretrained(local)
    return tokenizer
