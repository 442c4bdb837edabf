"""Tokens and words: what a text explanation is made of, and how pieces merge into words.

Plain Python: no torch, no captum. :func:`aggregate_words` and :func:`word_pieces`
are usable on their own with any fast tokenizer's offsets and word ids.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Optional


@dataclass
class TokenAttribution:
    """One tokenizer piece: its text as the tokenizer shows it (``"##ly"``,
    ``"Ġthe"``, ``"▁the"``), its character span ``text[start:end]`` in the original
    string as reported by the tokenizer, and its attribution."""

    token: str
    start: int
    end: int
    attribution: float


@dataclass
class WordAttribution:
    """One word: ``word == text[start:end]`` of the original string, attribution =
    sum over its pieces (see :func:`aggregate_words`)."""

    word: str
    start: int
    end: int
    attribution: float


@dataclass
class TextExplanation:
    """Explanation of one text; ``dataclasses.asdict`` gives a JSON-ready dict.

    ``method`` is the captum integration method and ``n_steps`` its number of
    steps. ``convergence_delta`` is ``{"absolute": |sum(attr) - (F(x) - F(x'))|,
    "relative": absolute / max(|F(x) - F(x')|, 1e-12)}`` where ``F`` is the target
    logit (minus the ``contrast`` logit when there is one). ``truncated`` is True
    when the text did not fit in ``max_length`` tokens and only its head was
    explained. Methods without integration (gradient x input, occlusion) set
    ``n_steps``, ``method`` and ``convergence_delta`` to None. ``precision`` is the
    autocast precision of the path's forward passes (``"fp32"``: none).
    ``converged``: with adaptive steps, whether the relative delta met the bound at
    ``n_steps``; None otherwise.
    """

    target: int
    layer: str | None
    n_steps: int | None
    method: str | None
    tokens: list[TokenAttribution]
    words: list[WordAttribution]
    top_words: list[WordAttribution]
    convergence_delta: dict | None
    truncated: bool
    contrast: int | None = None
    precision: str = "fp32"
    converged: Optional[bool] = None


def top_words(words: list[WordAttribution], k: int) -> list[WordAttribution]:
    """The ``k`` words of largest ``|attribution|``, largest first."""
    return sorted(words, key=lambda w: -abs(w.attribution))[:k]


def word_pieces(
    text: str, offsets: list[tuple[int, int]], word_ids: list[int | None] | None
) -> list[tuple[int, int, list[int]]]:
    """Words of ``text`` as ``(start, end, piece indices)`` by the rule of
    :func:`aggregate_words`: a word's attribution is the sum over these pieces,
    and every piece belongs to exactly one word (when there is a word at all)."""
    n = len(offsets)
    if word_ids is not None and len(word_ids) != n:
        raise ValueError("offsets and word_ids must have the same length")
    word_ids = [None] * n if word_ids is None else word_ids
    groups = []  # [start, end, pieces, word_id] per word
    carried = []
    for index, ((start, end), word_id) in enumerate(zip(offsets, word_ids)):
        start, end = _trim(text, start, end)
        last = groups[-1] if groups else None
        if start == end:
            if last is not None and word_id is not None and word_id == last[3]:
                last[2].append(index)
            else:
                carried.append(index)
            continue
        if last is not None and _same_word(text, last, start, word_id):
            last[0], last[1] = min(last[0], start), max(last[1], end)
            last[2].append(index)
            last[3] = word_id
        else:
            groups.append([start, end, carried + [index], word_id])
            carried = []
    if groups:
        groups[-1][2].extend(carried)
    for group, following in zip(groups, groups[1:] + [[len(text)]]):
        while group[1] < following[0] and _is_mark(text[group[1]]):
            group[1] += 1
    return [(s, e, sorted(pieces)) for s, e, pieces, _ in groups]


def aggregate_words(
    text: str,
    offsets: list[tuple[int, int]],
    word_ids: list[int | None] | None,
    token_attributions: list[float],
) -> list[WordAttribution]:
    """Merge sub-word pieces into words of the original ``text``.

    Rule, piece by piece in order (special tokens must already be removed):

    1. Each piece's span ``offsets[i]`` is trimmed of surrounding whitespace (byte
       BPE ``Ġword`` spans may include the leading space; a SentencePiece ``▁``
       piece may cover only a space, or nothing).
    2. A piece joins the previous word when both have a word id and the ids are
       equal (the tokenizer's own ``word_ids()``). Without ids (``word_ids`` None,
       or None for either piece) it joins when no whitespace lies between the two
       pieces: touching (``"un" "##believ" "##ably"``), overlapping (the bytes of
       one character), or separated only by characters the tokenizer dropped.
    3. A piece whose trimmed span is empty has no characters of its own: it joins
       the current word if it shares its word id, otherwise its attribution is
       carried to the next word (``"▁"`` prefixes the word after it), or to the
       last word when nothing follows. Attribution is thus conserved.
    4. Combining marks stay with their base character: a piece starting with one
       joins the word it touches (byte BPE splits ``e`` + U+0301 into two words),
       and marks right after a word that no piece covers (dropped by accent
       stripping) are added to its span.

    A word's attribution is the sum of its pieces', its span runs from the
    smallest start to the largest end of its pieces' trimmed spans and its text is
    ``text[start:end]``.
    """
    if len(token_attributions) != len(offsets):
        raise ValueError("offsets, word_ids and token_attributions must have the same length")
    return [
        WordAttribution(text[s:e], s, e, float(sum(token_attributions[i] for i in pieces)))
        for s, e, pieces in word_pieces(text, offsets, word_ids)
    ]


def _trim(text, start, end):
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _same_word(text, last, start, word_id):
    if start == last[1] and _is_mark(text[start]):
        return True
    if word_id is not None and last[3] is not None:
        return word_id == last[3]
    return not any(c.isspace() for c in text[last[1] : start])


def _is_mark(char):
    return unicodedata.category(char).startswith("M")
