"""Weighted, long prompts as AUTOMATIC1111 encodes them for CLIP text encoders.

A prompt in `a1111` syntax (`producer.prompt_syntax`) is runs of text at weights, cut by BREAKs. For a CLIP encoder
(77 positions: a start token, 75 tokens, an end token) A1111 tokenizes the runs, fills chunks of 75 tokens (a BREAK
closes the chunk it is in, padded), encodes each chunk on its own as `[start] + 75 + [end]`, scales each position's
embedding by its token's weight, restores the chunk's mean (so weights shift attention between words, not the
embedding's overall size), and joins the chunks along the sequence: a 200-token prompt is three chunks, 231
positions, every token seen. The cross-attention of a UNet takes any number of positions.

What diffusers would do with the same short, unweighted prompt is reproduced exactly: the same ids, padding and
hidden layer, so an `a1111` prompt without weights or BREAKs of up to 75 tokens encodes to diffusers' own tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from producer.prompt_syntax import Break, Piece, Weighted

CHUNK = 75  # tokens per CLIP chunk, between its start and end tokens

Hidden = Callable[[Any], torch.Tensor]
"""Picks the embeddings a family uses from an encoder's output (`output_hidden_states=True`)."""


@dataclass
class Chunk:
    """One 77-position CLIP input: ids with a start and an end token, the weight of each position."""

    ids: list[int]
    weights: list[float]
    tokens: int  # the prompt's tokens in it (no start, end or padding)


@dataclass
class Encoded:
    """One prompt for one image: embeddings (1, positions, width), the pooled vector where the family has one, and
    how many of the prompt's tokens each encoder saw."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    tokens: dict[str, int] = field(default_factory=dict)
    filler: torch.Tensor | None = None  # the empty prompt's chunk, that pads this one to a longer partner
    mask: torch.Tensor | None = None  # (1, positions) where a family's transformer masks the text (Chroma's)
    # The images one pipeline call makes of it: flow pipelines take given embeddings as the whole batch, unrepeated.
    images: int = 1


def chunks(tokenizer: Any, prompt: Weighted) -> list[Chunk]:
    """A1111's chunking of `prompt` for `tokenizer` (a CLIP tokenizer): runs of 75 tokens, a BREAK closing the
    chunk it is in; an empty prompt is one chunk of padding."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    done: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        count = len(ids)
        fill = CHUNK - count
        done.append(Chunk([start, *ids, end] + [pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill, count))
        ids.clear()
        weights.clear()

    for piece in prompt.pieces:
        if isinstance(piece, Break):
            if ids or not done:
                close()
            continue
        assert isinstance(piece, Piece)
        for token in tokenizer(piece.text, add_special_tokens=False, truncation=False)["input_ids"]:
            if len(ids) == CHUNK:
                close()
            ids.append(int(token))
            weights.append(piece.weight)
    if ids or not done:
        close()
    return done


def encode_chunks(
    encoder: Any, parts: Sequence[Chunk], hidden: Hidden, *, pooled: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each chunk through `encoder`, weighted with A1111's mean restored, joined along the sequence; with `pooled`,
    the first chunk's pooled (projected) vector too, as A1111 and diffusers take it."""
    device = encoder.device
    ids = torch.tensor([chunk.ids for chunk in parts], device=device)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = torch.tensor([[1] * (chunk.tokens + 2) + [0] * (CHUNK - chunk.tokens) for chunk in parts], device=device)
    output = encoder(ids, attention_mask=mask, output_hidden_states=True)
    embeds = hidden(output).to(dtype=encoder.dtype)
    weights = torch.tensor([chunk.weights for chunk in parts], device=device, dtype=embeds.dtype)
    embeds = emphasised(embeds, weights)
    joined = embeds.reshape(1, -1, embeds.shape[-1])
    return joined, (output[0][:1].to(dtype=encoder.dtype) if pooled else None)


def emphasised(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, positions, width) embeddings scaled by each position's weight (n, positions), each row's mean restored
    (A1111's and Forge's rule); unchanged where every weight is 1."""
    if not bool((weights != 1.0).any()):
        return embeds
    before = embeds.mean(dim=(1, 2), keepdim=True)
    embeds = embeds * weights.unsqueeze(-1)
    after = embeds.mean(dim=(1, 2), keepdim=True)
    # A1111 divides by the new mean unguarded; a layer norm without bias (an untrained encoder's) leaves a mean
    # of ~0, and the ratio would blow up: such a row keeps its weighted values as they are.
    sizeable = after.abs() > 1e-3 * embeds.abs().mean(dim=(1, 2), keepdim=True)
    return embeds * torch.where(sizeable, before / torch.where(sizeable, after, 1.0), 1.0)


def pad_to(embeds: torch.Tensor, positions: int, filler: torch.Tensor | None) -> torch.Tensor:
    """`embeds` lengthened to `positions` with copies of `filler` (the empty prompt's chunk), as A1111 pads the
    shorter of a prompt and its negative; cross-attention needs both halves of a CFG batch equally long."""
    if filler is None or positions <= embeds.shape[1]:
        return embeds
    missing = (positions - embeds.shape[1]) // filler.shape[1]
    return torch.cat([embeds, filler.expand(embeds.shape[0], -1, -1).repeat(1, missing, 1)], dim=1)


def seen(parts: Sequence[Chunk]) -> int:
    """The prompt's tokens the encoder saw: all of them."""
    return sum(chunk.tokens for chunk in parts)


# --- T5 (Flux.1, SD3, Chroma): one sequence, no chunks ------------------------------------------------------------

T5_MOST = 512
"""The most positions a T5 prompt takes (diffusers' `max_sequence_length` limit for Flux.1, SD3 and Chroma)."""


def sequence(tokenizer: Any, prompt: Weighted) -> tuple[list[int], list[float]]:
    """The prompt's token ids (no special tokens) and each token's weight, every run tokenized on its own as A1111
    and Forge tokenize them; a plain prompt is one run, so its ids are the tokenizer's own."""
    ids: list[int] = []
    weights: list[float] = []
    for piece in prompt.pieces:
        if isinstance(piece, Piece):
            tokens = tokenizer(piece.text, add_special_tokens=False, truncation=False)["input_ids"]
            ids += [int(token) for token in tokens]
            weights += [piece.weight] * len(tokens)
    return ids, weights


def t5_positions(tokenizer: Any, prompt: Weighted) -> int:
    """The positions `prompt` fills in a T5 input: its tokens and the end token."""
    return len(sequence(tokenizer, prompt)[0]) + 1


def encode_t5(
    encoder: Any, tokenizer: Any, prompt: Weighted, length: int, *, masked: bool = False
) -> tuple[torch.Tensor, int]:
    """`prompt` through a T5 encoder as diffusers pads it (its tokens, the end token, padding to `length`), each
    token's embedding scaled by its weight with the mean restored (`emphasised`); `masked`: with the padding masked
    out of the encoder's attention (Chroma's rule). Returns (1, length, width) and the prompt's token count."""
    ids, weights = sequence(tokenizer, prompt)
    count = len(ids)
    if count + 1 > length:
        raise ValueError(f"encode_t5: {count + 1} positions do not fit in {length}")
    fill = length - count - 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = encoder.device
    input_ids = torch.tensor([[*ids, tokenizer.eos_token_id] + [pad] * fill], device=device)
    mask = torch.tensor([[1] * (count + 1) + [0] * fill], device=device) if masked else None
    embeds = encoder(input_ids, attention_mask=mask, output_hidden_states=False)[0].to(dtype=encoder.dtype)
    scale = torch.tensor([[*weights, 1.0] + [1.0] * fill], device=device, dtype=embeds.dtype)
    return emphasised(embeds, scale), count
