"""Synthetic review/sentiment data with known deciding words.

Each review is a few clauses of neutral filler about a product, film or
restaurant plus exactly one sentiment phrase: a positive or negative cue word,
optionally preceded by a negator ("not", "never", "hardly", "far from") that
flips the label.  The character spans of the cue word and its negator are
recorded so explanations can be checked against ground truth.

Fillers deliberately reuse negators ("i did not order dessert") and
emotional-looking but label-neutral words ("the ending made my sister cry"),
so a classifier has to read the negator *next to* the cue word.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LABELS = ("negative", "positive")

POSITIVE = ("great", "excellent", "wonderful", "superb", "delightful",
            "fantastic", "brilliant", "lovely", "outstanding", "enjoyable")
NEGATIVE = ("terrible", "awful", "boring", "dreadful", "mediocre",
            "horrible", "disappointing", "bland", "poor", "tedious")
NEGATORS = ("not", "never", "hardly", "far from")

SUBJECTS = {
    "film": ("the plot", "the acting", "the soundtrack", "the ending",
             "the script", "the cast", "the movie", "the dialogue"),
    "restaurant": ("the food", "the service", "the staff", "the dessert",
                   "the pasta", "the menu", "the soup", "the meal"),
    "product": ("the blender", "the battery", "the charger", "the headset",
                "the build quality", "the screen", "the packaging", "the phone"),
}

FILLERS = {
    "film": ("my brother watched it on friday", "it runs about two hours",
             "we saw it at the downtown cinema", "the ending made my sister cry",
             "the villain is a scary old wizard", "it is a crime drama set in boston",
             "i did not see the first one", "the trailer came out in may",
             "there is a long car chase", "my dad laughed at the opening scene",
             "i had never heard of the director", "hardly anyone was in the cinema",
             "we sat far from the screen"),
    "restaurant": ("we went there on a tuesday", "the table was by the window",
                   "i did not order dessert", "my wife had the fish",
                   "the place was packed and loud", "we waited ten minutes for a seat",
                   "they close at nine", "the chef is from naples",
                   "i had never been there before", "i was starving when we arrived",
                   "it is far from the station", "hardly anyone ordered wine"),
    "product": ("it arrived on tuesday", "i bought it for my mother",
                "the box was blue", "it comes in three colors",
                "i did not read the manual", "setup took five minutes",
                "my old one broke last week", "it was shipped from ohio",
                "i use it every morning", "my cat was scared of the noise",
                "i have never owned one before", "it is hardly bigger than my hand",
                "we live far from the store"),
}

# Sentiment templates: "{phrase}" becomes "[negator ]cue"; "{subj}" a subject.
TEMPLATES = ("{subj} was {phrase}", "i found {subj} {phrase}",
             "overall it was {phrase}", "honestly, {subj} felt {phrase}",
             "my verdict: {phrase}", "i thought it was {phrase}",
             "{subj} is {phrase}", "in short, {phrase}")


@dataclass(frozen=True)
class ReviewSample:
    """One review: text, label index into LABELS, and deciding-word spans.

    ``cue_spans`` are (start, end-exclusive) character spans of every word that
    decides the label (negator words, then the cue word); ``sentiment_span`` is
    the span of the sentiment cue word alone.
    """

    text: str
    label: int
    cue_spans: tuple[tuple[int, int], ...]
    sentiment_span: tuple[int, int]

    @property
    def negated(self) -> bool:
        """Whether the sentiment cue word is negated."""
        return len(self.cue_spans) > 1


def _join(rng: random.Random, clauses: list[str]) -> str:
    """Join clauses with random separators, casing and final punctuation."""
    parts = []
    for i, c in enumerate(clauses):
        if i:
            parts.append(rng.choice((". ", ", ", "; ", " and ")))
        parts.append(c[0].upper() + c[1:] if rng.random() < 0.3 else c)
    return "".join(parts) + rng.choice((".", "!", "", "..."))


def _spans(start: int, words: list[str]) -> tuple[tuple[int, int], ...]:
    """Character spans of ``words`` written from ``start``, one space apart."""
    spans = []
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return tuple(spans)


def _sample(rng: random.Random) -> ReviewSample:
    """Draw one review from ``rng``."""
    domain = rng.choice(sorted(SUBJECTS))
    positive = rng.random() < 0.5
    cue = rng.choice(POSITIVE if positive else NEGATIVE)
    negator = rng.choice(NEGATORS) if rng.random() < 0.4 else ""
    words = negator.split() + [cue]

    clause = rng.choice(TEMPLATES).replace("{subj}", rng.choice(SUBJECTS[domain]))
    clauses = rng.sample(FILLERS[domain], rng.randint(1, 3))
    clauses.insert(rng.randint(0, len(clauses)), clause)
    text = _join(rng, clauses)
    spans = _spans(text.index("{phrase}"), words)
    text = text.replace("{phrase}", " ".join(words))
    return ReviewSample(text, int(positive != bool(negator)), spans, spans[-1])


def generate(n: int, seed: int) -> list[ReviewSample]:
    """Return ``n`` reviews, deterministically from ``seed``."""
    rng = random.Random(seed)
    return [_sample(rng) for _ in range(n)]


def flip_negation(sample: ReviewSample, rng: random.Random) -> ReviewSample:
    """The same review with its negation toggled, hence the opposite label.

    A negated cue loses its negator; a plain cue gets one drawn from ``rng``.
    Training on such minimal pairs forces a model to read the negator *and*
    the cue word.
    """
    start, end = sample.sentiment_span
    head = sample.cue_spans[0][0]
    negator = "" if sample.negated else rng.choice(NEGATORS)
    words = negator.split() + [sample.text[start:end]]
    text = sample.text[:head] + " ".join(words) + sample.text[end:]
    spans = _spans(head, words)
    return ReviewSample(text, 1 - sample.label, spans, spans[-1])


def generate_neutral(n: int, seed: int) -> list[str]:
    """Return ``n`` filler-only reviews without any sentiment phrase.

    Training on these with a uniform target teaches a model that text without
    a cue is uninformative, which keeps attribution baselines neutral.
    """
    rng = random.Random(seed)
    return [_join(rng, rng.sample(FILLERS[rng.choice(sorted(FILLERS))], rng.randint(1, 4)))
            for _ in range(n)]
