"""Image IG and Layer IG: equal to captum's direct calls, contrast = difference, compact maps."""
import json

import pytest
import torch
import torchvision
from captum.attr import IntegratedGradients, LayerIntegratedGradients

from tsexplain.attr.image_ig import ImageIG, sum_pool


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=6).eval()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.randn(2, 3, 48, 48)


def test_integrated_gradients_equals_captum_direct_call(resnet, inputs):
    out = ImageIG(resnet).attribute(inputs, [1, 4], n_steps=12, internal_batch_size=5)
    direct, delta = IntegratedGradients(resnet).attribute(
        inputs, baselines=torch.zeros_like(inputs), target=[1, 4], n_steps=12, return_convergence_delta=True)
    assert out.maps.shape == (2, 48, 48)
    torch.testing.assert_close(out.maps, direct.sum(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.delta, delta, rtol=1e-3, atol=1e-5)


def test_layer_ig_equals_captum_direct_call_and_converges(resnet, inputs):
    out = ImageIG(resnet, resnet.layer3).attribute(inputs, [2, 0], n_steps=64, internal_batch_size=32)
    direct = LayerIntegratedGradients(resnet, resnet.layer3).attribute(
        inputs, baselines=torch.zeros_like(inputs), target=[2, 0], n_steps=64)
    assert out.maps.shape == (2, 3, 3)
    torch.testing.assert_close(out.maps, direct.sum(dim=1), rtol=1e-4, atol=1e-6)
    # Completeness: the map adds up to F(x) - F(baseline) up to the reported delta, which is small.
    torch.testing.assert_close(out.maps.sum(dim=(1, 2)) - out.gap, out.delta, rtol=1e-3, atol=1e-5)
    assert (out.delta.abs() / out.gap.abs()).max() < 0.02


@pytest.mark.parametrize("layer", [None, "layer2"])
def test_contrast_equals_difference_of_attributions(resnet, inputs, layer):
    """IG is linear in the attributed function: IG(f_a - f_b) = IG(f_a) - IG(f_b)."""
    module = None if layer is None else getattr(resnet, layer)
    ig = ImageIG(resnet, module)
    both = ig.attribute(inputs, [3, 1], contrast=[0, 5], n_steps=8)
    a = ig.attribute(inputs, [3, 1], n_steps=8)
    b = ig.attribute(inputs, [0, 5], n_steps=8)
    torch.testing.assert_close(both.maps, a.maps - b.maps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(both.gap, a.gap - b.gap, rtol=1e-4, atol=1e-6)
    assert both.contrasts == [0, 5]


def test_internal_batch_size_does_not_change_the_result(resnet, inputs):
    ig = ImageIG(resnet)
    small = ig.attribute(inputs, [1, 2], contrast=[3, None], n_steps=6, internal_batch_size=2)
    whole = ig.attribute(inputs, [1, 2], contrast=[3, None], n_steps=6)
    torch.testing.assert_close(small.maps, whole.maps, rtol=1e-4, atol=1e-6)


def test_leaves_nothing_behind(resnet, inputs):
    ImageIG(resnet, resnet.layer4).attribute(inputs, [1, 2], n_steps=4)
    ImageIG(resnet).attribute(inputs, [1, 2], n_steps=4)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in resnet.modules())
    assert all(p.grad is None for p in resnet.parameters())


def test_sum_pool_keeps_totals():
    torch.manual_seed(2)
    maps = torch.randn(2, 224, 224)
    pooled = sum_pool(maps, 7, 7)
    assert pooled.shape == (2, 7, 7)
    torch.testing.assert_close(pooled.sum(dim=(1, 2)), maps.sum(dim=(1, 2)), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(pooled[0, 0, 0], maps[0, :32, :32].sum(), rtol=1e-4, atol=1e-4)


def test_compact_map_is_far_smaller_than_the_stock_answer(resnet):
    """TorchServe's stock IG answer is the [3, H, W] attribution list as JSON; ours
    is a channel-summed, pooled, rounded grid."""
    torch.manual_seed(3)
    image = torch.randn(1, 3, 224, 224)
    out = ImageIG(resnet).attribute(image, [1], n_steps=2)
    full, _ = IntegratedGradients(resnet).attribute(image, target=1, n_steps=2, return_convergence_delta=True)
    stock = json.dumps([full[0].tolist()], indent=2)  # what the stock handler's explain_handle returns
    pooled = sum_pool(out.maps, 7, 7)[0]
    scale = float(pooled.abs().max())
    compact = json.dumps({"shape": [7, 7], "values": [[round(v / scale, 3) for v in row] for row in pooled.tolist()],
                          "scale": scale}, separators=(",", ":"))
    assert len(compact) * 1000 < len(stock)
