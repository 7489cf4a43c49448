"""An offline T5 tokenizer whose Unigram vocabulary is made in code: single characters, no sentencepiece file.

Real Flux and SD3 checkpoints bring their own `spiece.model`; the tiny pipelines use this one so that no
file or hub is needed. Each printable ASCII and Latin-1 character is a piece, alone and after the word
marker, so every word of such a prompt splits into characters; any other character becomes `<unk>`.
"""

from __future__ import annotations

from transformers import T5Tokenizer

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
WORD = "▁"  # sentencepiece's word-start marker
MAX_LENGTH = 512  # Flux's longest T5 prompt; the tiny encoder's relative positions handle any length


def _characters() -> list[str]:
    return [chr(c) for c in (*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("ÿ") + 1))]


def vocabulary() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs in T5's order: pad, eos, unk first; equal scores for the rest."""
    characters = _characters()
    pieces = [WORD, *characters, *(WORD + c for c in characters)]
    return [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), *((piece, -1.0) for piece in pieces)]


def tiny_t5_tokenizer() -> T5Tokenizer:
    return T5Tokenizer(vocab=vocabulary(), extra_ids=0, model_max_length=MAX_LENGTH)
