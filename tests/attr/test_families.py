"""Every listed image family, from random weights at a small input size: the target
layer is chosen and proven automatically (tsexplain.attr.layer_choice), every method
runs, and Grad-CAM equals the plain reference computation (a fresh copy, a forward
hook and ``loss.backward()``, pytorch-grad-cam's reshapes with the inspected prefix).

Heavy families use a tiny configuration of the same class (the layer and layout are
found by class); timm and Hugging Face models are built from configs (no downloads),
the Hugging Face ones wrapped as serving wraps them (``.model``, logits out). The
README's family × method table lists these.
"""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from cam_reference import reference_maps, swin_reshape, vit_reshape
from tsexplain.attr.cam import CAM_METHODS, GradCAM
from tsexplain.attr.image_ig import ImageIG
from tsexplain.attr.layer_choice import choose_layer
from tsexplain.attr.layers import feature_map_shape, find_layout, find_target_layer, get_layer, grid_reshape


def tiny_vit():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model


def tiny_swin():
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                              window_size=[2, 2], num_classes=5)


def timm_model(name, **kw):
    timm = pytest.importorskip("timm", reason="timm (the optional extra `timm`) is not installed")
    model = timm.create_model(name, pretrained=False, num_classes=5, **kw)
    head = getattr(model, "head", None)
    head = getattr(head, "fc", head)
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.5)  # timm starts some heads near zero
    return model


class LogitsOf(nn.Module):
    """A Hugging Face classifier as serving wraps it (tsexplain.serving.models.LogitsOnly)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def hf_model(kind, **config):
    import transformers

    config_class, model_class = {
        "vit": ("ViTConfig", "ViTForImageClassification"),
        "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher"),
        "swin": ("SwinConfig", "SwinForImageClassification"),
        "convnext": ("ConvNextConfig", "ConvNextForImageClassification"),
        "resnet": ("ResNetConfig", "ResNetForImageClassification"),
    }[kind]
    return LogitsOf(getattr(transformers, model_class)(getattr(transformers, config_class)(num_labels=5, **config)))


HF_VIT = dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
              intermediate_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# family: (builder, input size, expected layer, layout)
FAMILIES = {
    "resnet": (lambda: torchvision.models.resnet18(num_classes=5), 64, "layer4", "nchw"),
    "resnext": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4, num_classes=5), 64, "layer4", "nchw"),
    "wide_resnet": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=5), 64, "layer4", "nchw"),
    "densenet": (lambda: torchvision.models.densenet121(num_classes=5), 64, "features", "nchw"),
    "vgg": (lambda: torchvision.models.vgg11(num_classes=5), 64, "features", "nchw"),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=5), 64, "features", "nchw"),
    "mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), 64, "features", "nchw"),
    "efficientnet": (lambda: torchvision.models.efficientnet_b0(num_classes=5), 64, "features", "nchw"),
    "regnet": (lambda: torchvision.models.regnet_y_400mf(num_classes=5), 64, "trunk_output", "nchw"),
    "convnext": (lambda: torchvision.models.convnext_tiny(num_classes=5), 64, "features", "nchw"),
    "vit": (tiny_vit, 32, "encoder.layers.encoder_layer_1.ln_1", "tokens"),
    "swin": (tiny_swin, 32, "features.3.0.norm1", "nhwc"),
    "timm_vit": (lambda: timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=16,
                                    num_heads=2), 32, "blocks.1.norm1", "tokens"),
    "timm_deit_distilled": (lambda: timm_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2,
                                               embed_dim=16, num_heads=2), 32, "blocks.1.norm1", "tokens"),
    "timm_vit_registers": (lambda: timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                              embed_dim=16, num_heads=2, reg_tokens=4), 32, "blocks.1.norm1", "tokens"),
    "timm_swin": (lambda: timm_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, depths=(1, 1),
                                     num_heads=(1, 2), embed_dim=16), 32, "layers.1.blocks.0.norm1", "nhwc"),
    "timm_convnext": (lambda: timm_model("convnext_atto", output_stride=16), 64, "stages.3", "nchw"),
    "timm_resnet": (lambda: timm_model("resnet18"), 64, "layer4", "nchw"),
    "hf_vit": (lambda: hf_model("vit", **HF_VIT), 32, "model.vit.layers.1.layernorm_before", "tokens"),
    "hf_deit_distilled": (lambda: hf_model("deit", **HF_VIT), 32, "model.deit.layers.1.layernorm_before", "tokens"),
    "hf_swin": (lambda: hf_model("swin", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                 window_size=2), 32, "model.swin.encoder.layers.1.blocks.0.layernorm_before", "tokens"),
    "hf_convnext": (lambda: hf_model("convnext", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2), 32,
                    "model.convnext.encoder.stages.1", "nchw"),
    "hf_resnet": (lambda: hf_model("resnet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                                   num_stages=2), 32, "model.resnet.encoder.stages.1", "nchw"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_layer_methods_and_gradcam_parity(family):
    build, size, expected_layer, expected_layout = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    inputs = torch.randn(2, 3, size, size)
    chosen = choose_layer(model, inputs[:1])
    name, layout = chosen.name, chosen.layout
    assert (name, layout) == (expected_layer, expected_layout)
    assert (find_target_layer(model, inputs[:1]), find_layout(model)) == (name, layout)
    layer = get_layer(model, name)
    shape = feature_map_shape(model, layer, inputs[:1], grid_reshape(chosen))
    grid = shape[2:]
    assert len(shape) == 4 and grid[0] * grid[1] > 1 and grid == (chosen.height, chosen.width)

    # Grad-CAM equals the plain reference, with pytorch-grad-cam's reshapes for transformers.
    reshape = {"tokens": lambda t: vit_reshape(t, *grid, chosen.prefix_tokens), "nhwc": swin_reshape}.get(layout)
    out = GradCAM(model, layer, chosen).attribute(inputs, [1, 3])
    logits, raw, maps = reference_maps("gradcam", model, name, inputs, [1, 3], reshape=reshape)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)
    for row in range(2):  # per row: min-max normalisation magnifies float noise by scale / span
        scale = raw[row].abs().max()
        span = raw[row].clamp(min=0).max() - raw[row].clamp(min=0).min()
        assert scale > 0
        torch.testing.assert_close(out.raw[row] / scale, raw[row] / scale, rtol=1e-3, atol=1e-4)
        if span > 1e-3 * scale:
            torch.testing.assert_close(out.heatmaps[row], maps[row], rtol=1e-3, atol=float(1e-4 * scale / span))

    # The other methods run and give maps on the same grid.
    mixed = GradCAM(model, layer, chosen).attribute(inputs, [0, 2], contrast=[4, None], methods=list(CAM_METHODS[1:]))
    assert mixed.heatmaps.shape == (2, *grid)
    assert torch.isfinite(mixed.heatmaps).all() and mixed.heatmaps.min() >= 0 and mixed.heatmaps.max() <= 1
    layer_ig = ImageIG(model, layer, chosen).attribute(inputs[:1], [1], contrast=[0], n_steps=3, internal_batch_size=2)
    assert layer_ig.maps.shape == (1, *grid) and torch.isfinite(layer_ig.maps).all()
    input_ig = ImageIG(model).attribute(inputs[:1], [3], n_steps=3, internal_batch_size=2)
    assert input_ig.maps.shape == (1, size, size) and torch.isfinite(input_ig.delta).all()
    # Completeness holds for input IG whatever the architecture: sum = gap + delta.
    torch.testing.assert_close(input_ig.maps.sum(dim=(1, 2)), input_ig.gap + input_ig.delta, rtol=1e-3, atol=1e-4)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("architecture,layer", [
    ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1"),
    ("swin_t", "features.7.1.norm1"),
    ("resnext50_32x4d", "layer4"),
    ("wide_resnet50_2", "layer4"),
    ("mobilenet_v3_large", "features"),
])
def test_full_size_builders_resolve_to_the_same_layers(architecture, layer):
    """The real builders (no forward pass) name the layers the tiny configurations use."""
    model = torchvision.models.get_model(architecture, weights=None)
    assert find_target_layer(model) == layer
