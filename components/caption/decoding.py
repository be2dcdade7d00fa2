"""Batched decoding over any autoregressive scorer: greedy, beam search and nucleus sampling.

The scorer is a function `logprobs(rows, tokens) -> [N, V]`: the next-token log-probabilities of N partial
sequences `tokens` [N, t] (t may be 0), where `rows` [N] says which input of the batch each sequence belongs
to (ClipCap uses it to pick the image's prefix). Decoders know nothing else about the model, so a toy LM with a
known best sequence tests them exactly (tests/test_caption_units.py).

Sequences are returned without the end token. `min_length` forbids the end token before that many tokens (an
undertrained decoder's likeliest caption is the empty one). Beam search ranks finished hypotheses by their
summed log-probability divided by length**length_penalty: 0 (the default) ranks by probability itself, so it
returns the highest-probability sequence it finds; 1 is the per-token average ClipCap's beam search uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LogProbs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _scores(logprobs: LogProbs, rows: torch.Tensor, tokens: torch.Tensor, eos_token_id: int, min_length: int
            ) -> torch.Tensor:
    step = logprobs(rows, tokens).float()
    if tokens.shape[1] < min_length:
        step[:, eos_token_id] = -torch.inf
    return step


def greedy(logprobs: LogProbs, batch: int, max_length: int, eos_token_id: int, min_length: int = 0
           ) -> list[list[int]]:
    return beam_search(logprobs, batch, max_length, eos_token_id, width=1, min_length=min_length)


def beam_search(logprobs: LogProbs, batch: int, max_length: int, eos_token_id: int, width: int = 5,
                min_length: int = 0, length_penalty: float = 0.0) -> list[list[int]]:
    """The best of `width` hypotheses per input, kept by total log-probability; a hypothesis ends at eos or at
    max_length tokens. Each step scores all live hypotheses of the whole batch in one call."""
    if width < 1:
        raise ValueError(f"beam width must be at least 1, got {width}")
    rows = torch.arange(batch)
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    scores = torch.zeros(batch)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]

    def ranked(score: float, length: int) -> float:
        return score / max(1, length) ** length_penalty

    for _ in range(max_length):
        if len(rows) == 0:
            break
        step = _scores(logprobs, rows, tokens, eos_token_id, min_length)
        vocab = step.shape[-1]
        candidates = scores[:, None] + step  # [N, V]
        next_rows, next_tokens, next_scores = [], [], []
        for item in range(batch):
            mine = (rows == item).nonzero().flatten()
            if len(mine) == 0:
                continue
            flat = candidates[mine].flatten()
            best = flat.topk(min(width, flat.numel())).indices
            for index in best.tolist():
                hypothesis, token = mine[index // vocab], index % vocab
                score = float(flat[index])
                if token == eos_token_id:
                    sequence = tokens[hypothesis].tolist()
                    finished[item].append((ranked(score, len(sequence)), sequence))
                else:
                    next_rows.append(item)
                    next_tokens.append(torch.cat([tokens[hypothesis], torch.tensor([token])]))
                    next_scores.append(score)
        # With ranking by probability, an input stops once its best finished hypothesis beats every live one
        # (scores only fall); a length penalty can still lift a longer one, so then beams run to max_length.
        live = [i for i, item in enumerate(next_rows)
                if length_penalty or not finished[item] or next_scores[i] > max(s for s, _ in finished[item])]
        rows = torch.tensor([next_rows[i] for i in live], dtype=torch.long)
        tokens = torch.stack([next_tokens[i] for i in live]) if live else torch.zeros(0, 0, dtype=torch.long)
        scores = torch.tensor([next_scores[i] for i in live])
    for row, sequence, score in zip(rows.tolist(), tokens.tolist(), scores.tolist()):
        finished[row].append((ranked(score, len(sequence)), sequence))  # ran out of length
    return [max(found, key=lambda pair: pair[0])[1] if found else [] for found in finished]


def nucleus(logprobs: LogProbs, batch: int, max_length: int, eos_token_id: int, top_p: float = 0.9,
            temperature: float = 1.0, generator: torch.Generator | None = None, min_length: int = 0
            ) -> list[list[int]]:
    """Sampling from the smallest set of tokens whose probability reaches top_p (Holtzman et al. 2020)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rows = torch.arange(batch)
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_length):
        step = (_scores(logprobs, rows, tokens, eos_token_id, min_length) / temperature).softmax(dim=-1)
        ordered, order = step.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is under top_p (the first token is always kept).
        keep = (ordered.cumsum(dim=-1) - ordered) < top_p
        ordered = ordered * keep
        choice = torch.multinomial(ordered / ordered.sum(dim=-1, keepdim=True), 1, generator=generator)
        token = order.gather(-1, choice).squeeze(-1)
        token = torch.where(done, torch.full_like(token, eos_token_id), token)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        done |= token == eos_token_id
        if bool(done.all()):
            break
    out = []
    for sequence in tokens.tolist():
        out.append(sequence[:sequence.index(eos_token_id)] if eos_token_id in sequence else sequence)
    return out
