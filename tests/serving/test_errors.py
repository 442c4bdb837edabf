"""Errors at the edge: the maths raises plain exceptions, serving maps them to types and statuses
in one table (tsexplain.serving.errors), and README's "Errors" lists that table."""
import pytest

from tsexplain.attr.errors import AttributionInputError, EmptyText, SameClass, TooManyWords, UnknownClass
from tsexplain.serving.errors import ERROR_TYPES, DeadlineExceeded, RequestError, explanation_error


@pytest.mark.parametrize("raised,kind,status", [
    (EmptyText("text 0 is empty"), "empty_text", 400),
    (TooManyWords("text 0 has 300 words"), "too_many_words", 413),
    (UnknownClass("target 7 is outside [0, 3)", "target"), "unknown_target", 400),
    (UnknownClass("contrast 7 is outside [0, 3)", "contrast"), "unknown_contrast", 400),
    (SameClass("contrast 1 is the target itself"), "bad_contrast", 400),
    (AttributionInputError("something else about the input"), "bad_request", 400),
    (DeadlineExceeded(250, 260), "deadline_exceeded", 504),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory", 507),
    (MemoryError(), "out_of_memory", 507),
    (KeyError("a bug in the server at /srv/x.py"), "explanation_failed", 503),
])
def test_explanation_errors_map_to_their_type_and_status(raised, kind, status):
    error = explanation_error(raised)
    assert (error.kind, error.status) == (kind, status)
    assert error.to_json() == {"code": status, "type": kind, "message": error.message}
    if kind in ("explanation_failed", "out_of_memory"):  # the server's own errors say nothing of its internals
        assert "/srv" not in error.message and "Tried" not in error.message


def test_deadline_message_names_the_limit_and_the_settings():
    error = explanation_error(DeadlineExceeded(250, 260), 250)
    assert "250 ms" in error.message and "deadline_ms" in error.message


def test_every_request_error_type_is_in_the_table():
    assert RequestError("x", "too_many_explanations").status == 429
    with pytest.raises(ValueError, match="ERROR_TYPES"):
        RequestError("x", "not_a_type")
    assert all(400 <= status < 600 and when for status, when in ERROR_TYPES.values())
