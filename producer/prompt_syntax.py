"""A1111's prompt syntax: attention weights, BREAK and prompt editing, for specs with `prompt_syntax: "a1111"`.

The syntax is stable-diffusion-webui's (its wiki's "Attention/emphasis" and "Prompt editing", and
`modules/prompt_parser.py`, whose results this module reproduces, float for float):

- `(text)` multiplies the weight by 1.1, `[text]` by 1/1.1, `(text:1.3)` by 1.3; nested weights multiply
  (innermost first, as A1111 multiplies). `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal; a backslash makes any
  character literal (`\\:` is a colon that is never a weight's).
- `BREAK` (uppercase, a word of its own) ends the text encoder's 75-token chunk: the rest of the chunk is padding.
- `[from:to:when]` swaps `from` for `to`, `[to:when]` adds `to`, `[from::when]` removes `from`. `when` with a
  `.` is a fraction of the steps (A1111's "new" rule: `int(when * steps)`), without one a step count. The change
  takes effect at the 0-based sampler step `when` resolves to, so `from` is used for exactly that many steps:
  with 20 steps `[cat:dog:0.5]` is `cat` for steps 0-9 and `dog` from step 10; `[cat:dog:0]` is `dog`
  throughout; a `when` at or beyond the steps never switches. Edits nest inside weights and weights inside edits.

Where this parser deliberately differs from A1111 (each an error naming the 0-based position and the fix):

- Unbalanced or crossed brackets, which A1111 silently reads some way or other: a spec is checked before it runs.
- A weight that is not a number (`(a:x)`), a weight outside -10..10, more than one `:` in `( )` or more than two in
  `[ ]`, a `when` that is not a number, is negative, or is a fraction above 1 (A1111 spends fractions above 1 on
  its hires-fix pass, which this farm does not run: write a step count without `.`).
- `[a|b]` alternation and `AND` composition, which have no equivalent here.
- A1111's prompt editing switches one step later than its wiki says (its sampler keeps `from` while
  `step <= when`, 0-based, so `from` runs `when + 1` steps). This module follows the wiki's words, `when` steps of
  `from`, which is also how many steps the spec's own `step_index` fields count.
- A1111 drops the whitespace around `BREAK`; it is kept here (the tokenizer ignores it either way), so that
  `Weighted.text()` never glues the words on either side together.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NoReturn, TypeAlias

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
MAX_ABS_WEIGHT = 10.0
MAX_DEPTH = 50
"""Brackets nest at most this deep (1.1 ** 50 is a weight of 117 already); the parser recurses once per level."""

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\Z")
_BREAK = re.compile(r"\bBREAK\b")
_AND = re.compile(r"\bAND\b")
_CLOSER = {"(": ")", "[": "]"}
# What is plain text where: ':' separates a weight or an edit's parts inside brackets, '|' is refused inside [ ].
_PLAIN_RUN = {
    None: re.compile(r"[^\\()\[\]]+"),
    "(": re.compile(r"[^\\()\[\]:]+"),
    "[": re.compile(r"[^\\()\[\]:|]+"),
}


class PromptSyntaxError(ValueError):
    """Raised when a prompt is not valid A1111 syntax; the message names the field, the position and the fix."""

    def __init__(self, message: str, *, field: str, position: int) -> None:
        super().__init__(message)
        self.field = field
        self.position = position


@dataclass(frozen=True)
class Piece:
    """A run of text at one weight (never empty)."""

    text: str
    weight: float


@dataclass(frozen=True)
class Break:
    """A1111's BREAK: the text encoder's chunk ends here (padded to its end)."""


@dataclass(frozen=True)
class Weighted:
    """A prompt as the text encoder gets it at one step: runs of text with their weights, and BREAKs."""

    pieces: tuple[Piece | Break, ...]

    def text(self) -> str:
        """The words alone, weights and BREAKs dropped: what an encoder without weights would be given."""
        return "".join(piece.text for piece in self.pieces if isinstance(piece, Piece))

    def is_plain(self) -> bool:
        """True when no weight differs from 1 and there is no BREAK: the plain prompt `text()` means the same."""
        return all(isinstance(piece, Piece) and piece.weight == 1.0 for piece in self.pieces)


@dataclass(frozen=True)
class Span:
    """The prompt in effect from 0-based sampler step `first_step` until the next span's."""

    first_step: int
    prompt: Weighted


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Emphasis:
    children: tuple[_Node, ...]
    multiplier: float


@dataclass(frozen=True)
class _Edit:
    before: tuple[_Node, ...]
    after: tuple[_Node, ...]
    when: float
    fraction: bool

    def step(self, steps: int) -> int:
        return int(self.when * steps) if self.fraction else int(self.when)


_Node: TypeAlias = "_Text | Break | _Emphasis | _Edit"


@dataclass
class _Segment:
    start: int
    end: int = -1
    nodes: list[_Node] = field(default_factory=list)


class _Parser:
    def __init__(self, source: str, field: str) -> None:
        self.src = source
        self.field = field
        self.pos = 0
        self.edits: list[_Edit] = []
        self.depth = 0

    def fail(self, position: int, message: str) -> NoReturn:
        raise PromptSyntaxError(f"{self.field}: position {position}: {message}", field=self.field, position=position)

    def parse(self) -> tuple[_Node, ...]:
        (segment,) = self._segments(None, 0)
        return tuple(segment.nodes)

    def _segments(self, opener: str | None, opened_at: int) -> list[_Segment]:
        src, plain = self.src, _PLAIN_RUN[opener]
        segments = [_Segment(self.pos)]
        while self.pos < len(src):
            char, at, nodes = src[self.pos], self.pos, segments[-1].nodes
            if run := plain.match(src, at):
                nodes.extend(self._plain(run.group(), at))
                self.pos = run.end()
            elif char == "\\":
                nodes.extend([_Text(src[at + 1])] if at + 1 < len(src) else [])
                self.pos += 2
            elif char in "([":
                self.pos += 1
                nodes.append(self._group(char, at))
            elif char in ")]":
                self._check_close(char, at, opener, opened_at)
                segments[-1].end = at
                self.pos += 1
                return segments
            elif char == ":":
                segments[-1].end = at
                segments.append(_Segment(at + 1))
                self.pos += 1
            else:
                self.fail(
                    at,
                    "alternation [a|b] (a different prompt every other step) is not supported; "
                    "remove the '|' or escape it as \\|",
                )
        if opener is not None:
            closer = _CLOSER[opener]
            self.fail(
                opened_at, f"unclosed '{opener}' opened here; close it with '{closer}' or escape it as \\{opener}"
            )
        segments[-1].end = len(src)
        return segments

    def _check_close(self, char: str, at: int, opener: str | None, opened_at: int) -> None:
        if opener is None:
            self.fail(at, f"'{char}' closes nothing; remove it or escape it as \\{char}")
        if char != _CLOSER[opener]:
            self.fail(
                at,
                f"'{char}' does not close the '{opener}' opened at position {opened_at}; close that with "
                f"'{_CLOSER[opener]}' first, or escape this one as \\{char}",
            )

    def _plain(self, text: str, start: int) -> list[_Node]:
        if found := _AND.search(text):
            self.fail(
                start + found.start(),
                "AND (composing several prompts) is not supported; write 'and' in lower case to keep the word",
            )
        nodes: list[_Node] = []
        for i, part in enumerate(_BREAK.split(text)):
            if i:
                nodes.append(Break())
            if part:
                nodes.append(_Text(part))
        return nodes

    def _group(self, opener: str, opened_at: int) -> _Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(opened_at, f"brackets nested more than {MAX_DEPTH} deep; remove some")
        segments = self._segments(opener, opened_at)
        self.depth -= 1
        first = tuple(segments[0].nodes)
        if opener == "(":
            if len(segments) == 1:
                return _Emphasis(first, ROUND_MULTIPLIER)
            if len(segments) > 2:
                self.fail(
                    segments[2].start - 1,
                    "a second ':' in '( )'; a weight is written (text:1.2), and a literal colon as \\:",
                )
            weight = self._number(segments[1], "the weight after ':' in (text:weight)", "1.2")
            if not abs(weight) <= MAX_ABS_WEIGHT:
                self.fail(
                    segments[1].start,
                    f"weight {weight:g} is outside -{MAX_ABS_WEIGHT:g}..{MAX_ABS_WEIGHT:g}; use a smaller one",
                )
            return _Emphasis(first, weight)
        if len(segments) == 1:
            return _Emphasis(first, SQUARE_MULTIPLIER)
        if len(segments) > 3:
            self.fail(
                segments[3].start - 1,
                "a third ':' in '[ ]'; an edit is written [from:to:when], and a literal colon as \\:",
            )
        last = segments[-1]
        when = self._number(last, "the step after the last ':' in [from:to:when]", "10 (steps) or 0.5 (a fraction)")
        raw = self.src[last.start : last.end]
        if when < 0:
            self.fail(last.start, f"the step {raw.strip()} is negative; give 0 or more")
        fraction = "." in raw
        if fraction and when > 1:
            self.fail(
                last.start,
                f"{raw.strip()} is a fraction of the steps (it has a '.') above 1, which would never be reached; "
                "write a step count without '.', or a fraction up to 1",
            )
        before = first if len(segments) == 3 else ()
        after = tuple(segments[-2].nodes)
        edit = _Edit(before, after, when, fraction)
        self.edits.append(edit)
        return edit

    def _number(self, segment: _Segment, what: str, example: str) -> float:
        raw = self.src[segment.start : segment.end]
        match = _NUMBER.match(raw)
        if match is None:
            shown = raw if len(raw) <= 40 else raw[:37] + "..."
            self.fail(
                segment.start, f"{what} must be a number like {example}; got {shown!r} (escape a literal colon as \\:)"
            )
        value = float(match.group(1))
        if not math.isfinite(value):  # pragma: no cover - the pattern has no exponent
            self.fail(segment.start, f"{what} must be finite")
        return value


@lru_cache(maxsize=256)
def _parse(text: str, field: str) -> tuple[tuple[_Node, ...], tuple[_Edit, ...]]:
    parser = _Parser(text, field)
    nodes = parser.parse()
    return nodes, tuple(parser.edits)


def _at_step(nodes: tuple[_Node, ...], step: int, steps: int) -> list[Piece | Break]:
    out: list[Piece | Break] = []
    for node in nodes:
        if isinstance(node, _Text):
            out.append(Piece(node.text, 1.0))
        elif isinstance(node, Break):
            out.append(node)
        elif isinstance(node, _Emphasis):
            for piece in _at_step(node.children, step, steps):
                out.append(Piece(piece.text, piece.weight * node.multiplier) if isinstance(piece, Piece) else piece)
        else:
            out.extend(_at_step(node.before if step < node.step(steps) else node.after, step, steps))
    return out


def _merged(pieces: list[Piece | Break]) -> Weighted:
    out: list[Piece | Break] = []
    for piece in pieces:
        if isinstance(piece, Piece):
            if not piece.text:
                continue
            last = out[-1] if out else None
            if isinstance(last, Piece) and last.weight == piece.weight:
                out[-1] = Piece(last.text + piece.text, last.weight)
                continue
        out.append(piece)
    return Weighted(tuple(out))


def check(text: str, *, field: str = "prompt") -> None:
    """Raise `PromptSyntaxError` (a ValueError) naming `field`, the 0-based position and the fix if `text` is not
    valid A1111 syntax as this module reads it."""
    _parse(text, field)


def schedule(text: str, steps: int, *, field: str = "prompt") -> list[Span]:
    """The prompt's spans over `steps` sampler steps, in step order: the first at step 0, no two adjacent alike.
    A prompt without editing is one span."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    nodes, edits = _parse(text, field)
    starts = sorted({0} | {s for edit in edits if 0 < (s := edit.step(steps)) < steps})
    spans: list[Span] = []
    for start in starts:
        prompt = _merged(_at_step(nodes, start, steps))
        if not spans or spans[-1].prompt != prompt:
            spans.append(Span(start, prompt))
    return spans


def switch_steps(text: str, steps: int, *, field: str = "prompt") -> list[int]:
    """The 0-based steps at which the prompt changes: every span's first step but the first span's."""
    return [span.first_step for span in schedule(text, steps, field=field)[1:]]


def max_edit_step(text: str, *, field: str = "prompt") -> int | None:
    """The largest `when` written as a step count (no '.'), to check against the steps; None if there is none."""
    _, edits = _parse(text, field)
    counts = [int(edit.when) for edit in edits if not edit.fraction]
    return max(counts) if counts else None
