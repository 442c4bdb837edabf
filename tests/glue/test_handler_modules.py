"""TorchServe's loader refuses a handler module that defines more than one class."""
import importlib
import sys

import pytest
from ts.utils.util import list_classes_from_module

from harness import ROOT


@pytest.mark.parametrize("module,cls", [("image_explainer", "ImageExplainer"), ("text_explainer", "TextExplainer")])
def test_handler_module_defines_exactly_one_class(module, cls):
    loaded = set(sys.modules)
    sys.path.insert(0, str(ROOT / "handlers"))
    try:
        handler = importlib.import_module(module)
    finally:
        sys.path.remove(str(ROOT / "handlers"))
        for name in (module, "ts_glue"):  # leave the MAR-based tests their own imports
            if name not in loaded:
                sys.modules.pop(name, None)
    assert [c.__name__ for c in list_classes_from_module(handler)] == [cls]
