"""An offline CLIP tokenizer whose vocabulary is made in code: the 256 byte symbols, no merges.

Real checkpoints bring their own tokenizer files; the tiny pipelines use this one so that no
file or hub is needed. Every byte of any prompt still maps to a token, so prompts of any
language tokenize without unknown tokens.
"""

from __future__ import annotations

from functools import cache

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


@cache
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2's reversible byte-to-unicode table, which CLIP's byte-level BPE uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return tuple(chr(c) for c in codes)


def vocabulary() -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def tiny_clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=vocabulary(), merges=[], model_max_length=MAX_LENGTH)
