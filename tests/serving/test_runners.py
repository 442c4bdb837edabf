"""The runners' own steps that need no model: rendering and load-time checks."""
import pytest
import torch
from torch import nn

from tsexplain.attr.text.tokens import WordAttribution
from tsexplain.serving.errors import ConfigError
from tsexplain.serving.runners.image import ImageRunner
from tsexplain.serving.runners.text import render_html
from tsexplain.serving.settings import load_settings


def test_image_model_without_a_spatial_layer_fails_to_load_saying_how_to_fix_it():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    settings = load_settings("image", {"handler": {"resize": [2, 2], "crop": None}}, "m", {})
    with pytest.raises(ConfigError, match="no layer with a spatial feature map.*explain.target_layer"):
        ImageRunner(model, model, None, settings, torch.device("cpu"))
    settings = load_settings("image", {"handler": {"resize": [2, 2], "crop": None},
                                       "explain": {"target_layer": "2"}}, "m", {})
    with pytest.raises(ConfigError, match="'2' is not a module.*explain.target_layer"):
        ImageRunner(model, model, None, settings, torch.device("cpu"))


def test_render_html_escapes_and_keeps_every_word():
    text = 'say <script>alert("x")</script> & go'
    words = [
        WordAttribution("say", 0, 3, 0.5),
        WordAttribution('<script>alert("x")</script>', 4, 31, -1.0),
        WordAttribution("go", 34, 36, 0.0),
    ]
    out = render_html(words, text)
    assert "<script>" not in out and "&lt;script&gt;" in out and "&amp;" in out
    assert out.count("<span") == 3
    assert "rgba(0, 160, 0, 0.500)" in out and "rgba(220, 0, 0, 1.000)" in out
    assert 'title="-1"' in out
    plain = out.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    for word in words:
        assert f">{word.word}</span>" in plain
