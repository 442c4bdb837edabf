"""Grad-CAM core: equal to a plain autograd computation, and leaves nothing behind."""
import pytest
import torch
import torchvision

from tsexplain.attr.cam import GradCAM, normalize_maps
from tsexplain.attr.layers import get_layer


def reference_gradcam(model, layer, inputs, targets):
    """Textbook Grad-CAM: full forward with grad, hook the activation, backward."""
    saved = {}
    handle = layer.register_forward_hook(lambda m, a, out: saved.__setitem__("act", out))
    inputs = inputs.clone().requires_grad_(True)
    logits = model(inputs)
    handle.remove()
    maps = []
    for row, target in enumerate(targets):
        (grad,) = torch.autograd.grad(logits[row, target], saved["act"], retain_graph=True)
        act = saved["act"][row].detach()
        weights = grad[row].mean(dim=(1, 2))
        maps.append(torch.relu((weights[:, None, None] * act).sum(0)))
    maps = torch.stack(maps)
    flat = maps.flatten(1)
    low, high = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return logits.detach(), (maps - low) / (high - low)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


def test_equals_plain_autograd(resnet):
    torch.manual_seed(1)
    inputs = torch.randn(3, 3, 96, 96)
    targets = [2, 5, 0]
    layer = get_layer(resnet, "layer3")
    out = GradCAM(resnet, layer).attribute(inputs, targets)
    ref_logits, ref_maps = reference_gradcam(resnet, layer, inputs, targets)
    assert out.targets == targets
    assert out.heatmaps.shape == (3, 6, 6)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.heatmaps, ref_maps, rtol=1e-4, atol=1e-5)


def test_rows_subset_and_predicted_target(resnet):
    torch.manual_seed(2)
    inputs = torch.randn(4, 3, 64, 64)
    layer = get_layer(resnet, "layer2")
    out = GradCAM(resnet, layer).attribute(inputs, [None, 3], rows=[1, 3])
    predicted = out.logits[1].argmax().item()
    assert out.targets == [predicted, 3]
    _, ref = reference_gradcam(resnet, layer, inputs[[1, 3]], [predicted, 3])
    torch.testing.assert_close(out.heatmaps, ref, rtol=1e-4, atol=1e-5)
    # A row explained within a batch equals the same row explained alone.
    alone = GradCAM(resnet, layer).attribute(inputs[3:4], [3])
    torch.testing.assert_close(out.heatmaps[1], alone.heatmaps[0], rtol=1e-4, atol=1e-5)


def test_leaves_nothing_behind(resnet):
    layer = get_layer(resnet, "layer4")
    with torch.no_grad():
        GradCAM(resnet, layer).attribute(torch.randn(2, 3, 64, 64))
        assert not torch.is_grad_enabled()
    for module in resnet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert all(p.grad is None for p in resnet.parameters())
    assert torch.is_grad_enabled()


def test_no_parameter_gradients_computed(resnet):
    """The body before the target layer records no graph at all."""
    seen = []
    handle = resnet.layer1.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        GradCAM(resnet, resnet.layer3).attribute(torch.randn(1, 3, 64, 64))
    finally:
        handle.remove()
    assert seen == [False]


def test_refuses_inference_mode(resnet):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        GradCAM(resnet, resnet.layer4).attribute(torch.randn(1, 3, 64, 64))


def test_inplace_layer_after_target():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 2),
    ).eval()
    out = GradCAM(model, model[0]).attribute(torch.randn(2, 3, 8, 8), [0, 1])
    assert out.heatmaps.shape == (2, 6, 6)
    assert torch.isfinite(out.heatmaps).all()


def test_normalize_maps_range_and_zero_map():
    maps = torch.stack([torch.arange(4.0).reshape(2, 2) + 3, torch.zeros(2, 2)])
    out = normalize_maps(maps)
    assert out[0].min() == 0 and out[0].max() == 1
    assert (out[1] == 0).all()
