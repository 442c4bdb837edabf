"""Target-layer discovery on torchvision families built with random weights."""
import pytest
import torch
import torchvision
from torch import nn

from tsexplain.attr.cam import GradCAM
from tsexplain.attr.layers import feature_map_shape, find_target_layer, get_layer

FAMILIES = {
    "resnet18": "layer4",
    "mobilenet_v3_small": "features",
    "efficientnet_b0": "features",
    "densenet121": "features",
    "convnext_tiny": "features",
    "vgg11": "features",
    "regnet_y_400mf": "trunk_output",
}


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_discovery_and_gradcam_run(architecture):
    torch.manual_seed(0)
    model = torchvision.models.get_model(architecture, weights=None, num_classes=5).eval()
    example = torch.randn(1, 3, 128, 128)
    name = find_target_layer(model, example)
    assert name == FAMILIES[architecture]
    layer = get_layer(model, name)
    shape = feature_map_shape(model, layer, example)
    assert len(shape) == 4 and shape[2] * shape[3] > 1
    out = GradCAM(model, layer).attribute(example)
    assert out.heatmaps.shape == (1, shape[2], shape[3])
    assert 0 <= out.heatmaps.min() and out.heatmaps.max() <= 1


def test_subclass_of_known_family_is_found():
    class MyResNet(torchvision.models.ResNet):
        def __init__(self):
            super().__init__(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3)

    assert find_target_layer(MyResNet()) == "layer4"


def test_unknown_model_uses_last_spatial_module():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    assert find_target_layer(model, torch.randn(1, 3, 16, 16)) == "3"


def test_no_spatial_layer_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="no layer with a spatial feature map"):
        find_target_layer(model, torch.randn(1, 3, 2, 2))  # serving adds "set explain.target_layer"


def test_unknown_layer_name_suggests_close_matches():
    model = torchvision.models.resnet18(num_classes=2)
    with pytest.raises(ValueError, match="layer4"):
        get_layer(model, "layer5")
    assert get_layer(model, "layer4.1.conv2") is model.layer4[1].conv2
