"""Text tokenizers: a byte-level BPE trained here on the training captions, or any Hugging Face tokenizer.

The trained tokenizer is saved in transformers' format beside the model, so `AutoTokenizer.from_pretrained(dir)`
(and `CLIPModel` users) load it without this package.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
# Special-token order fixes their ids: pad 0, bos 1, unk 2, eos 3. EOS must not be 2: transformers' CLIP text
# model treats eos_token_id == 2 as "legacy" and pools at the largest token id instead of at EOS.
SPECIAL_TOKENS = [PAD, BOS, UNK, EOS]


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2/CLIP) trained on `texts`; lower-cased like CLIP's; BOS text EOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((t for t in texts if t), trainer=trainer)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)


def captions_from_shards(shard_dir: Path, limit: int = 1_000_000, column: str = "caption",
                         where: dict | None = None) -> Iterator[str]:
    """Stream up to `limit` captions from the shards' Parquet metadata (a few columns, never a whole dataset);
    `where` keeps only rows whose columns equal the given values (e.g. {"split": "train"})."""
    where = dict(where or {})
    seen = 0
    for path in sorted(Path(shard_dir).glob("[0-9]*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=[column, *where], batch_size=8192):
            rows = batch.to_pydict()
            keep = [all(rows[k][i] == v for k, v in where.items()) for i in range(batch.num_rows)]
            for caption, kept in zip(rows[column], keep):
                if caption and kept:
                    yield caption
                    seen += 1
                    if seen >= limit:
                        return


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """Any tokenizer transformers can load: a local directory, or a hub name where a hub is reachable."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
