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
        for name in (module, "explain_common"):  # leave the MAR-based tests their own imports
            if name not in loaded:
                sys.modules.pop(name, None)
    assert [c.__name__ for c in list_classes_from_module(handler)] == [cls]


def test_ranked_rows_are_the_row_by_row_rankings_ties_included():
    """The handlers rank a batch with one topk per distinct top_k: the same (index, label,
    probability) lists, in the same order, as a topk of each row alone."""
    import torch

    loaded = set(sys.modules)
    sys.path.insert(0, str(ROOT / "handlers"))
    try:
        ranked_rows = importlib.import_module("explain_common").ranked_rows
    finally:
        sys.path.remove(str(ROOT / "handlers"))
        if "explain_common" not in loaded:
            sys.modules.pop("explain_common", None)
    generator = torch.Generator().manual_seed(0)
    for classes in (2, 6, 1000):
        labels = [f"c{i}" for i in range(classes)]
        batches = [torch.softmax(torch.randn(7, classes, generator=generator), 1),
                   torch.softmax(torch.randn(7, classes, generator=generator) * 100, 1),  # exact zeros tie
                   torch.full((7, classes), 1 / classes),  # every class ties
                   torch.randint(0, 3, (7, classes), generator=generator).float() / 3]
        for probabilities in batches:
            for top_ks in ([5] * 7, [1, 5, 2, 1000, 5, 3, 1]):
                expected = []
                for row, top_k in zip(probabilities, top_ks):
                    values, indices = row.topk(min(top_k, classes))
                    expected.append([(i, labels[i], p) for i, p in zip(indices.tolist(), values.tolist())])
                assert ranked_rows(probabilities, labels, top_ks) == expected
