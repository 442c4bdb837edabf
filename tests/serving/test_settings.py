"""Settings: YAML section, environment overrides, loud validation."""
import pytest

from tsexplain.serving.errors import ConfigError
from tsexplain.serving.settings import ImageExplainSettings, ImageModelSettings, env_names, load_section


def test_defaults_and_yaml():
    s = load_section(ImageExplainSettings, {"target_layer": "layer3", "outputs": ["overlay_png"]}, "shapes", {})
    assert s.target_layer == "layer3" and s.outputs == ["overlay_png"] and s.heatmap_size == "feature"


def test_environment_overrides_model_specific_first():
    env = {"TSEXPLAIN_TARGET_LAYER": "layer2", "TSEXPLAIN_MY_MODEL_TARGET_LAYER": "layer1",
           "TSEXPLAIN_HEATMAP_DECIMALS": "4"}
    s = load_section(ImageExplainSettings, {"target_layer": "layer4"}, "my-model", env)
    assert s.target_layer == "layer1" and s.heatmap_decimals == 4
    assert env_names("my-model", "top_k") == ["TSEXPLAIN_MY_MODEL_TOP_K", "TSEXPLAIN_TOP_K"]
    m = load_section(ImageModelSettings, {}, "other", {"TSEXPLAIN_RESIZE": "[64, 80]", "TSEXPLAIN_CROP": "null"})
    assert m.resize == [64, 80] and m.crop is None


@pytest.mark.parametrize("cls,section,message", [
    (ImageExplainSettings, {"target_layr": "x"}, "unknown setting"),
    (ImageExplainSettings, {"method": "lime"}, "method"),
    (ImageExplainSettings, {"heatmap_size": "big"}, "heatmap_size"),
    (ImageExplainSettings, {"outputs": ["png"]}, "outputs"),
    (ImageExplainSettings, {"overlay_alpha": 2}, "overlay_alpha"),
    (ImageModelSettings, {"top_k": 0}, "top_k"),
    (ImageModelSettings, {"resize": "big"}, "resize"),
    (ImageModelSettings, {"crop": None, "resize": 256}, "fixed input size"),
    (ImageModelSettings, {"std": [0, 1, 1]}, "std"),
    (ImageModelSettings, {"num_classes": True}, "num_classes"),
])
def test_nonsense_fails_loudly(cls, section, message):
    with pytest.raises(ConfigError, match=message):
        load_section(cls, section, "m", {})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="TSEXPLAIN_TOP_K"):
        load_section(ImageModelSettings, {}, "m", {"TSEXPLAIN_TOP_K": "[unclosed"})


@pytest.mark.parametrize("section,message", [
    ({"policy": "sometimes"}, "policy"),
    ({"on_denied": "ignore"}, "on_denied"),
    ({"priority_values": []}, "priority_values"),
    ({"priority_header": "X Priority"}, "priority_header"),
    ({"token_env": "A", "token_file": "/b"}, "not both"),
    ({"max_per_batch": -1}, "max_per_batch"),
    ({"request_overrides": ["html"]}, "request_overrides"),  # a text-only field
    ({"enabled": "yes"}, "enabled"),
])
def test_access_settings_validated(section, message):
    with pytest.raises(ConfigError, match=message):
        load_section(ImageExplainSettings, section, "m", {})


def test_text_settings_bounds():
    from tsexplain.serving.settings import TextExplainSettings

    with pytest.raises(ConfigError, match="n_steps"):
        load_section(TextExplainSettings, {"n_steps": 300, "max_n_steps": 256}, "m", {})
    with pytest.raises(ConfigError, match="max_n_steps"):  # more than the text explainers take
        load_section(TextExplainSettings, {"max_n_steps": 4096}, "m", {})
    s = load_section(TextExplainSettings, {"request_overrides": ["target"]}, "m", {"TSEXPLAIN_POLICY": "priority"})
    assert s.policy == "priority" and s.allows_override("target") and not s.allows_override("n_steps")


def test_unquoted_off_means_off():
    import yaml

    assert load_section(ImageExplainSettings, yaml.safe_load("policy: off"), "m", {}).policy == "off"
    assert load_section(ImageExplainSettings, {}, "m", {"TSEXPLAIN_POLICY": "off"}).policy == "off"


@pytest.mark.parametrize("section,message", [
    ({"precision": "fp8"}, "precision"),
    ({"n_steps": "many"}, "n_steps"),
    ({"internal_batch_size": "max"}, "internal_batch_size"),
    ({"memory_budget_mb": 0}, "memory_budget_mb"),
    ({"adaptive_start": 0}, "adaptive_start"),
    ({"adaptive_start": 64, "adaptive_max": 32}, "adaptive_start"),
    ({"n_steps": "auto", "adaptive_max": 512}, "adaptive_max"),
    ({"max_relative_delta": 0}, "max_relative_delta"),
    ({"cache_mb": -1}, "cache_mb"),
    ({"cache_entries": 1.5}, "cache_entries"),
])
def test_speed_and_cache_settings_validated(section, message):
    from tsexplain.serving.settings import TextExplainSettings

    with pytest.raises(ConfigError, match=message):
        TextExplainSettings(**section)


def test_adaptive_max_left_out_follows_a_lower_max_n_steps():
    """The default adaptive steps must not break a configuration that only lowers max_n_steps;
    an adaptive_max set above it is still an error (the parametrized cases above)."""
    from tsexplain.serving.runners.text import explainer_options
    from tsexplain.serving.settings import DEFAULT_ADAPTIVE_MAX, TextExplainSettings

    assert TextExplainSettings().adaptive_top == DEFAULT_ADAPTIVE_MAX == 256
    low = TextExplainSettings(max_n_steps=64)
    assert low.n_steps == "auto" and low.adaptive_max is None and low.adaptive_top == 64
    assert TextExplainSettings(max_n_steps=64, adaptive_max=32).adaptive_top == 32
    settings = type("Settings", (), {"explain": low, "handler": type("Handler", (), {"max_length": None})()})()
    assert explainer_options("layer_ig", settings)["adaptive"].max == 64
    with pytest.raises(ConfigError, match="adaptive_start"):
        TextExplainSettings(max_n_steps=4)  # adaptive_start 8 cannot fit: said, not silently changed


def test_speed_and_cache_settings_accept_auto():
    from tsexplain.serving.settings import TextExplainSettings

    s = TextExplainSettings(n_steps="auto", internal_batch_size="auto", precision="auto", cache_mb=0)
    assert (s.n_steps, s.internal_batch_size, s.precision, s.cache_mb) == ("auto", "auto", "auto", 0)
    assert ImageExplainSettings(cache_mb=0.5, cache_entries=10).cache_entries == 10


@pytest.mark.parametrize("section,message", [
    ({"methods": []}, "explain.methods"),
    ({"methods": ["gradcam", "scorecam"]}, "explain.methods"),
    ({"methods": [["gradcam"]]}, "explain.methods"),
    ({"method": ["gradcam"]}, "explain.method"),
    ({"method": "lime"}, "explain.method"),
    ({"method": "layer_ig"}, "not in explain.methods"),  # the default list has the CAM methods only
    ({"feature_layout": "nwhc"}, "feature_layout"),
    ({"methods": ["layer_ig"], "method": "layer_ig", "n_steps": 200}, "n_steps"),
    ({"internal_batch_size": 0}, "internal_batch_size"),
    ({"integration_method": "simpson"}, "integration_method"),
])
def test_image_method_settings_validated(section, message):
    with pytest.raises(ConfigError, match=message):
        load_section(ImageExplainSettings, section, "m", {})


def test_image_methods_from_the_environment():
    s = load_section(ImageExplainSettings, {}, "m", {"TSEXPLAIN_M_METHODS": "[gradcam, layer_ig]",
                                                     "TSEXPLAIN_M_METHOD": "layer_ig"})
    assert s.methods == ["gradcam", "layer_ig"] and s.method == "layer_ig"


def test_text_methods_allow_list():
    from tsexplain.serving.settings import TextExplainSettings

    s = load_section(TextExplainSettings, {}, "m", {})
    assert s.method == "layer_ig" and s.methods == ["layer_ig", "grad_x_input", "occlusion"]
    s = load_section(TextExplainSettings, {"method": "occlusion"}, "m", {"TSEXPLAIN_M_METHODS": "[occlusion]"})
    assert s.methods == ["occlusion"] and "contrast" in s.override_fields
    for section, message in (({"methods": []}, "explain.methods"), ({"methods": ["lime"]}, "explain.methods"),
                             ({"methods": ["occlusion"]}, "explain.method 'layer_ig'"),
                             ({"method": "lime"}, "explain.method 'lime'"),
                             ({"occlusion_max_words": 0}, "occlusion_max_words")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_section(TextExplainSettings, section, "m", {})
