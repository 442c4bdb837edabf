"""Unit tests of the synthetic review generator."""

import random
import re

import pytest

from tsexplain.tools.synthetic.reviews import (
    LABELS, NEGATIVE, NEGATORS, POSITIVE, ReviewSample, flip_negation, generate,
    generate_neutral)

CUES = set(POSITIVE) | set(NEGATIVE)


@pytest.fixture(scope="module")
def samples() -> list[ReviewSample]:
    return generate(2000, seed=7)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_labels():
    assert LABELS == ("negative", "positive")


def test_deterministic():
    assert generate(200, seed=3) == generate(200, seed=3)
    assert generate(200, seed=3) != generate(200, seed=4)
    assert generate_neutral(50, seed=3) == generate_neutral(50, seed=3)


def test_balanced(samples):
    positive = sum(s.label for s in samples) / len(samples)
    negated = sum(s.negated for s in samples) / len(samples)
    assert 0.45 < positive < 0.55
    assert 0.3 < negated < 0.5
    assert {s.label for s in samples if s.negated} == {0, 1}


def test_short(samples):
    assert max(len(s.text.split()) for s in samples) <= 40


def test_exactly_one_cue_word(samples):
    for s in samples:
        assert sum(w in CUES for w in words(s.text)) == 1, s.text


def check_spans(s: ReviewSample) -> None:
    """Assert that the spans of ``s`` cover its cue word and negator words."""
    start, end = s.sentiment_span
    assert s.text[start:end].lower() in CUES
    assert s.cue_spans[-1] == s.sentiment_span
    for a, b in s.cue_spans:
        assert s.text[a:b].isalpha()
        assert a == 0 or not s.text[a - 1].isalnum()
        assert b == len(s.text) or not s.text[b].isalnum()
    negator = " ".join(s.text[a:b].lower() for a, b in s.cue_spans[:-1])
    assert negator in NEGATORS if s.negated else negator == ""
    if s.negated:  # the negator directly precedes the cue word
        assert s.text[s.cue_spans[-2][1]:start] == " "


def test_spans_point_at_cue_words(samples):
    for s in samples:
        check_spans(s)


def test_negation_flips_label(samples):
    for s in samples:
        positive_cue = s.text[slice(*s.sentiment_span)].lower() in POSITIVE
        assert s.label == int(positive_cue != s.negated), s.text


def test_flip_negation(samples):
    rng = random.Random(0)
    for s in samples[:300]:
        flipped = flip_negation(s, rng)
        check_spans(flipped)
        assert flipped.label == 1 - s.label
        assert flipped.negated != s.negated
        cue = s.text[slice(*s.sentiment_span)]
        assert flipped.text[slice(*flipped.sentiment_span)] == cue
        plain, negated = (s, flipped) if flipped.negated else (flipped, s)
        head, end = negated.cue_spans[0][0], negated.sentiment_span[0]
        assert negated.text[:head] + negated.text[end:] == plain.text


def test_neutral_has_no_cue():
    for text in generate_neutral(500, seed=1):
        assert not CUES & set(words(text)), text
