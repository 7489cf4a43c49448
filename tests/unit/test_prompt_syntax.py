"""producer.prompt_syntax against A1111's own documented examples (modules/prompt_parser.py's doctests, its wiki),
the edit-step rule, and the errors' positions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from producer.prompt_syntax import (
    Break,
    Piece,
    PromptSyntaxError,
    Span,
    Weighted,
    check,
    max_edit_step,
    schedule,
    switch_steps,
)

B = "BREAK"


def pieces(text: str, steps: int = 10, at: int = 0) -> list[tuple[str, float] | str]:
    """The pieces of the span in effect at step `at`, as A1111's parse_prompt_attention lists them."""
    span = [s for s in schedule(text, steps) if s.first_step <= at][-1]
    return [(p.text, p.weight) if isinstance(p, Piece) else B for p in span.prompt.pieces]


def texts(text: str, steps: int) -> list[tuple[int, str]]:
    return [(span.first_step, span.prompt.text()) for span in schedule(text, steps)]


# parse_prompt_attention's doctests, float for float (A1111 multiplies the innermost bracket first).
ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    # A1111's own example leaves its first '(' open (closed at the end of the text); here it is closed there.
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("[quiet]", [("quiet", 1 / 1.1)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1.5) b", [("a", -1.5), (" b", 1.0)]),
    ("(a : 1.3 )", [("a ", 1.3)]),
    ("((a:2):1.5)", [("a", 3.0)]),
    ("a \\\\ b \\: c", [("a \\ b : c", 1.0)]),
    ("()[]x", [("x", 1.0)]),
    ("(a)(b)[c]", [("ab", 1.1), ("c", 1 / 1.1)]),
    ("one BREAK two", [("one ", 1.0), B, (" two", 1.0)]),
    ("(one BREAK two)", [("one ", 1.1), B, (" two", 1.1)]),
    ("BREAKFAST, a BREAK", [("BREAKFAST, a ", 1.0), B]),
    ("score: 9, photo", [("score: 9, photo", 1.0)]),
    ("a | b", [("a | b", 1.0)]),
    ("(a|b)", [("a|b", 1.1)]),
    ("<lora:x:0.5> cat", [("<lora:x:0.5> cat", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION, ids=[t for t, _ in ATTENTION])
def test_attention_weights_match_a1111(text: str, expected: list[tuple[str, float] | str]) -> None:
    assert pieces(text) == expected


# get_learned_conditioning_prompt_schedules' doctests (10 steps). A1111 lists each prompt with the last step it is
# used at, switching one step later than its wiki says; here each prompt is listed with the step it starts at,
# `when` steps after the start (see the module docstring), and the texts are A1111's.
SCHEDULES = [
    ("test", 10, [(0, "test")]),
    ("a [b:3]", 10, [(0, "a "), (3, "a b")]),
    ("a [b: 3]", 10, [(0, "a "), (3, "a b")]),
    ("a [[[b]]:2]", 10, [(0, "a "), (2, "a b")]),
    ("[(a:2):3]", 10, [(0, ""), (3, "a")]),
    ("a [b : c : 1] d", 10, [(0, "a b  d"), (1, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(0, "abe"), (1, "ace"), (2, "ade")]),
    ("a [b:.5] c", 10, [(0, "a  c"), (5, "a b c")]),
    ("a [b:3 ] c", 10, [(0, "a  c"), (3, "a b c")]),
    # The module's header example, 100 steps.
    (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[ in background:0.25] [shoddy:masterful:0.5]",
        100,
        [
            (0, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (25, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (50, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (60, "fantasy landscape with a lake and an oak in background masterful"),
            (75, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ],
    ),
    # The wiki's: [from:to:when] with a fraction and a step count; removing; the brief's example.
    ("a [fantasy:cyberpunk:16] landscape", 100, [(0, "a fantasy landscape"), (16, "a cyberpunk landscape")]),
    ("[cat:dog:0.5]", 20, [(0, "cat"), (10, "dog")]),
    ("[cat:dog:0.25]", 30, [(0, "cat"), (7, "dog")]),  # int(0.25 * 30) = 7, A1111's rounding down
    ("[cat::4] sky", 10, [(0, "cat sky"), (4, " sky")]),
    # At 0 the edit has happened from the start; at or beyond the steps it never happens.
    ("[cat:dog:0]", 10, [(0, "dog")]),
    ("[cat:dog:0.0]", 10, [(0, "dog")]),
    ("[cat:dog:10]", 10, [(0, "cat")]),
    ("[cat:dog:1.0]", 10, [(0, "cat")]),
    ("[cat:dog:500]", 10, [(0, "cat")]),
    ("[cat:dog:9]", 10, [(0, "cat"), (9, "dog")]),
    # An edit that changes nothing visible does not split the prompt; two at the same step are one switch.
    ("[a:a:3]", 10, [(0, "a")]),
    ("[a:b:3] [c:d:0.3]", 10, [(0, "a c"), (3, "b d")]),
    # An edit inside an edit's branch that is never in effect still does not change the spans.
    ("[[x:y:2]:z:1]", 10, [(0, "x"), (1, "z")]),
]


@pytest.mark.parametrize(("text", "steps", "expected"), SCHEDULES, ids=[t[:40] for t, _, _ in SCHEDULES])
def test_schedules_match_a1111_texts_at_the_documented_steps(
    text: str, steps: int, expected: list[tuple[int, str]]
) -> None:
    assert texts(text, steps) == expected
    assert switch_steps(text, steps) == [first for first, _ in expected[1:]]


def test_weights_inside_edits_and_edits_inside_weights() -> None:
    spans = schedule("(a [b:(c:1.5):2]:1.2) d", 10)
    assert spans == [
        Span(0, Weighted((Piece("a b", 1.2), Piece(" d", 1.0)))),
        Span(2, Weighted((Piece("a ", 1.2), Piece("c", 1.5 * 1.2), Piece(" d", 1.0)))),
    ]
    assert pieces("[(big:1.4) cat:small dog:0.5]", 10, at=0) == [("big", 1.4), (" cat", 1.0)]
    assert pieces("[(big:1.4) cat:small dog:0.5]", 10, at=5) == [("small dog", 1.0)]


def test_weighted_text_and_is_plain() -> None:
    (span,) = schedule("a (big:1.3) cat BREAK on a mat", 10)
    assert span.prompt.text() == "a big cat  on a mat"
    assert not span.prompt.is_plain()
    (plain,) = schedule("a [b:c:0] d", 10)
    assert plain.prompt == Weighted((Piece("a c d", 1.0),)) and plain.prompt.is_plain()
    (broken,) = schedule("a BREAK b", 10)
    assert not broken.prompt.is_plain() and Break() in broken.prompt.pieces
    (empty,) = schedule("[x::0]", 10)
    assert empty.prompt.pieces == () and empty.prompt.text() == "" and empty.prompt.is_plain()


def test_no_piece_is_empty_and_neighbours_of_one_weight_merge() -> None:
    for text, _ in ATTENTION:
        runs = [p for p in schedule(text, 10)[0].prompt.pieces]
        assert all(not isinstance(p, Piece) or p.text for p in runs)
        assert all(
            not (isinstance(a, Piece) and isinstance(b, Piece) and a.weight == b.weight)
            for a, b in zip(runs, runs[1:], strict=False)
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("plain", None), ("[a:b:0.5]", None), ("[a:b:3] [c:12] [d::0.9]", 12), ("[a:[b:c:30]:4]", 30)],
)
def test_max_edit_step_is_the_largest_step_count(text: str, expected: int | None) -> None:
    assert max_edit_step(text) == expected


ERRORS = [
    # (text, position, what the message says)
    ("a (cat", 2, "unclosed '(' opened here; close it with ')' or escape it as \\("),
    ("a [cat", 2, "unclosed '[' opened here; close it with ']' or escape it as \\["),
    ("((a) b", 0, "unclosed '('"),
    ("cat)", 3, "')' closes nothing; remove it or escape it as \\)"),
    ("cat] x", 3, "']' closes nothing"),
    ("(cat]", 4, "']' does not close the '(' opened at position 0"),
    ("[cat)", 4, "')' does not close the '[' opened at position 0"),
    ("a (cat:x)", 7, "weight after ':' in (text:weight) must be a number like 1.2; got 'x'"),
    ("a (cat:)", 7, "must be a number like 1.2; got ''"),
    ("(cat:1.2.3)", 5, "must be a number"),
    ("(cat:11)", 5, "weight 11 is outside -10..10"),
    ("(cat:-10.5)", 5, "weight -10.5 is outside -10..10"),
    ("(a:b:1.2)", 4, "a second ':' in '( )'"),
    ("[a:b:c:3]", 6, "a third ':' in '[ ]'"),
    ("a [cat:dog:soon]", 11, "the step after the last ':' in [from:to:when] must be a number"),
    ("[style: anime]", 7, "must be a number like 10 (steps) or 0.5 (a fraction); got ' anime'"),
    ("[a:b:-3]", 5, "the step -3 is negative"),
    ("[a:b:1.5]", 5, "1.5 is a fraction of the steps"),
    ("[a:b:2.]", 5, "write a step count without '.'"),
    ("a [cat|dog] b", 6, "alternation [a|b]"),
    ("[fe|]male", 3, "alternation [a|b]"),
    ("cat AND dog", 4, "AND (composing several prompts) is not supported"),
    ("(x [a:b:z])", 8, "must be a number"),
    ("(" * 60 + "deep" + ")" * 60, 50, "brackets nested more than 50 deep"),
]


@pytest.mark.parametrize(("text", "position", "message"), ERRORS, ids=[t[:20] for t, _, _ in ERRORS])
def test_errors_name_the_field_the_position_and_the_fix(text: str, position: int, message: str) -> None:
    with pytest.raises(PromptSyntaxError) as caught:
        check(text, field="negative_prompt")
    error = caught.value
    assert str(error).startswith(f"negative_prompt: position {position}: ")
    assert message in str(error)
    assert (error.field, error.position) == ("negative_prompt", position)
    assert isinstance(error, ValueError)
    with pytest.raises(PromptSyntaxError, match=rf"^prompt: position {position}: "):
        schedule(text, 10)


@pytest.mark.parametrize("text", [t for t, _ in ATTENTION] + [t for t, _, _ in SCHEDULES])
def test_valid_prompts_pass_the_check(text: str) -> None:
    check(text)


def test_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="steps must be at least 1; got 0"):
        schedule("a", 0)


def test_spans_cover_every_step_with_the_prompt_a_step_by_step_reading_gives() -> None:
    """The spans against a brute force: the prompt at each step, taken from the spans, equals the prompt schedule()
    gives for that step alone when every edit is resolved by hand."""
    text = "a [b:c:0.3] [(d:1.2)::7] [e:2] (f [g:h:0.55]:0.8)"
    steps = 20
    spans = schedule(text, steps)
    for step in range(steps):
        current = [s for s in spans if s.first_step <= step][-1].prompt
        b_or_c = "b" if step < 6 else "c"
        d = step < 7
        e = step >= 2
        g_or_h = "g" if step < 11 else "h"
        expected = [Piece(f"a {b_or_c} ", 1.0)]
        if d:
            expected += [Piece("d", 1.2), Piece(" ", 1.0)]
        else:
            expected[-1] = Piece(expected[-1].text + " ", 1.0)
        if e:
            expected[-1] = Piece(expected[-1].text + "e ", 1.0)
        else:
            expected[-1] = Piece(expected[-1].text + " ", 1.0)
        expected.append(Piece(f"f {g_or_h}", 0.8))
        assert current == Weighted(tuple(expected)), step
    assert [s.first_step for s in spans] == [0, 2, 6, 7, 11]


def test_the_modules_import_nothing_heavy() -> None:
    code = (
        "import sys, producer.prompt_syntax, producer.png_params; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'PIL', 'numpy', 'diffusers', 'worker'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
