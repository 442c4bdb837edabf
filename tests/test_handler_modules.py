"""TorchServe's loader takes the one class a handler module defines; a second class
(a helper dataclass, say) stops the model from loading in a real TorchServe."""
import importlib
import sys
from pathlib import Path

import pytest
from ts.utils.util import list_classes_from_module

HANDLERS = Path(__file__).resolve().parent.parent / "handlers"


@pytest.mark.parametrize("module,expected", [("image_explainer", "ImageExplainer"), ("text_explainer", "TextExplainer")])
def test_handler_module_defines_one_class(module, expected):
    sys.path.insert(0, str(HANDLERS))
    try:
        classes = list_classes_from_module(importlib.import_module(module))
    finally:
        sys.path.remove(str(HANDLERS))
    assert [c.__name__ for c in classes] == [expected]
