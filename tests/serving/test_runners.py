"""The runners' own steps that need no model: rendering and load-time checks."""
import pytest
import torch
from torch import nn

from tsexplain.attr.text.tokens import WordAttribution
from tsexplain.serving.errors import ConfigError
from tsexplain.serving.models import LogitsOnly
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


def tiny_hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return LogitsOnly(ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=4, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        num_labels=3))).eval()


def image_runner(model, **explain):
    settings = load_settings("image", {"handler": {"resize": [32, 32], "crop": None}, "explain": explain}, "m", {})
    return ImageRunner(model, model, None, settings, torch.device("cpu"))


def test_a_wrapped_hugging_face_vit_gets_its_known_good_layer_proven_at_load():
    runner = image_runner(tiny_hf_vit())
    assert runner.layer_name == "model.vit.layers.1.layernorm_before"
    assert runner.feature_size == (8, 8)
    out = runner.gradcam.attribute(torch.randn(2, 3, 32, 32), [0, 2])
    assert out.heatmaps.shape == (2, 8, 8)


@pytest.mark.parametrize("explain,why", [
    ({"target_layer": "model.vit.layernorm"}, "cells get no gradient"),  # after it only the class token counts
    ({"target_layer": "model.vit.layers.1.attention.q_proj", "feature_layout": "nchw"}, "expected 4 dimensions"),
    ({"feature_layout": "nhwc"}, "not a spatial grid"),
])
def test_a_layer_that_is_no_spatial_grid_fails_to_load_listing_the_candidates(explain, why):
    with pytest.raises(ConfigError, match=why) as caught:
        image_runner(tiny_hf_vit(), **explain)
    message = str(caught.value)
    assert "model.vit.layers.1.layernorm_before (tokens, 1 prefix token, 8x8 cells, 32 channels)" in message
    assert "explain.target_layer" in message and "explain.feature_layout" in message


def test_the_issues_timm_vit_keys_fail_to_load():
    timm = pytest.importorskip("timm", reason="timm (the optional extra `timm`) is not installed")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=4,
                              depth=2, embed_dim=32, num_heads=2).eval()
    with pytest.raises(ConfigError, match=r"'blocks.1.attn.k_norm' is not a spatial grid: it outputs \[1, 2, 65, 16\]"):
        image_runner(model, target_layer="blocks.1.attn.k_norm")
    assert image_runner(model).layer_name == "blocks.1.norm1"


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


def test_a_model_without_parameters_loads_in_fp32():
    """No parameters to read a dtype from (a fixed filter bank, say): fp32, not a StopIteration at load."""
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten()).eval()  # 48 "classes" from a 32x32 input
    runner = image_runner(model, target_layer="0")
    assert runner.precision == "fp32" and len(runner.labels) == 48
