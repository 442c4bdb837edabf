"""What the attribution methods raise for inputs they cannot explain.

Plain exceptions without HTTP statuses: the serving layer maps them to answers
(``tsexplain.serving.errors``). Bad *arguments* (an unknown layer, a rule that
does not exist) raise ``ValueError`` instead.
"""


class AttributionInputError(ValueError):
    """An input (a text, a target class) that the method cannot explain."""


class EmptyText(AttributionInputError):
    """A text that is empty, whitespace only, or has no tokens."""


class UnknownClass(AttributionInputError):
    """A target or contrast class outside the model's classes (``field``: which of the two)."""

    def __init__(self, message: str, field: str = "target"):
        super().__init__(message)
        self.field = field


class SameClass(AttributionInputError):
    """A contrast class equal to the target it is contrasted with."""


class TooManyWords(AttributionInputError):
    """A text with more words than the method explains (occlusion's cost grows with them)."""
