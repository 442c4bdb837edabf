"""Grad-CAM++, LayerCAM and contrastive maps: equal to independent computations."""
import pytest
import torch
import torchvision
from torch import nn

from cam_reference import reference_maps
from tsexplain.attr.cam import CAM_METHODS, GradCAM, GradCAMPlusPlus, LayerCAM
from tsexplain.attr.layers import get_layer


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


@pytest.mark.parametrize("cls", [GradCAM, GradCAMPlusPlus, LayerCAM])
def test_each_method_equals_the_plain_computation(resnet, cls):
    torch.manual_seed(1)
    inputs = torch.randn(3, 3, 80, 80)
    targets = [2, 5, 0]
    out = cls(resnet, resnet.layer3).attribute(inputs, targets)
    logits, raw, maps = reference_maps(cls.method, resnet, "layer3", inputs, targets)
    assert out.methods == [cls.method] * 3 and out.targets == targets
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    scale = raw.abs().max()
    torch.testing.assert_close(out.raw / scale, raw / scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.heatmaps, maps, rtol=1e-4, atol=1e-4)


def test_methods_differ(resnet):
    """Guards the test above against three names for one formula."""
    torch.manual_seed(1)
    inputs = torch.randn(1, 3, 80, 80)
    raws = [cls(resnet, resnet.layer3).attribute(inputs, [3]).raw for cls in (GradCAM, GradCAMPlusPlus, LayerCAM)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.allclose(raws[a] / raws[a].abs().max(), raws[b] / raws[b].abs().max(), atol=1e-3)


def test_mixed_methods_share_one_pass_and_equal_separate_calls(resnet):
    torch.manual_seed(2)
    inputs = torch.randn(4, 3, 64, 64)
    calls = []
    hook = resnet.fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        mixed = GradCAM(resnet, resnet.layer3).attribute(
            inputs, [1, None, 4], rows=[0, 2, 3], contrast=[None, 6, 0], methods=["layercam", "gradcam", "gradcam++"])
    finally:
        hook.remove()
    assert len(calls) == 1
    for j, (row, target, contrast, method) in enumerate(
            [(0, 1, None, "layercam"), (2, None, 6, "gradcam"), (3, 4, 0, "gradcam++")]):
        alone = GradCAM(resnet, resnet.layer3).attribute(inputs[row:row + 1], [target], contrast=[contrast],
                                                         methods=[method])
        assert mixed.targets[j] == alone.targets[0] and mixed.methods[j] == method
        torch.testing.assert_close(mixed.heatmaps[j], alone.heatmaps[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_contrast_is_the_map_of_the_logit_difference(resnet, method):
    torch.manual_seed(3)
    inputs = torch.randn(2, 3, 64, 64)
    out = GradCAM(resnet, resnet.layer3).attribute(inputs, [1, 2], contrast=[4, 0], methods=[method] * 2)
    _, raw, maps = reference_maps(method, resnet, "layer3", inputs, [1, 2], contrasts=[4, 0])
    assert out.contrasts == [4, 0]
    scale = raw.abs().max()
    torch.testing.assert_close(out.raw / scale, raw / scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.heatmaps, maps, rtol=1e-4, atol=1e-4)


def test_gradcam_contrast_equals_difference_of_maps(resnet):
    """Grad-CAM's pre-ReLU map is linear in the score: contrast map = map(A) - map(B)."""
    torch.manual_seed(4)
    inputs = torch.randn(2, 3, 64, 64)
    cam = GradCAM(resnet, resnet.layer3)
    both = cam.attribute(inputs, [3, 1], contrast=[5, 6])
    a = cam.attribute(inputs, [3, 1]).raw
    b = cam.attribute(inputs, [5, 6]).raw
    scale = both.raw.abs().max()
    torch.testing.assert_close(both.raw / scale, (a - b) / scale, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both.raw, a, atol=1e-3 * float(scale))


def test_gradcam_pp_closed_form_equals_exact_higher_derivatives(monkeypatch):
    """The paper's alpha with exact 2nd/3rd derivatives of Y = exp(S), by autograd,
    equals the closed form when S is piecewise linear in the activation (without
    the eps that guards the division; with it, within a few percent here)."""
    import tsexplain.attr.cam

    monkeypatch.setattr(tsexplain.attr.cam, "GRADCAM_PP_EPS", 0.0)
    torch.manual_seed(5)
    target_layer = nn.Conv2d(3, 2, 3)
    head = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    model = nn.Sequential(target_layer, head).eval()
    inputs = torch.randn(1, 3, 6, 6)
    target = 1
    out = GradCAMPlusPlus(model, target_layer).attribute(inputs, [target])

    act = target_layer(inputs).detach().requires_grad_(True)
    y = torch.exp(head(act)[0, target])
    (first,) = torch.autograd.grad(y, act, create_graph=True)
    second = torch.zeros_like(act)
    third = torch.zeros_like(act)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in act.shape[1:]]):
        c, i, j = index.tolist()
        (g2,) = torch.autograd.grad(first[0, c, i, j], act, create_graph=True)
        (g3,) = torch.autograd.grad(g2[0, c, i, j], act, retain_graph=True)
        second[0, c, i, j], third[0, c, i, j] = g2[0, c, i, j].detach(), g3[0, c, i, j]
    sum_act = act.detach().sum(dim=(2, 3), keepdim=True)
    alpha = second / (2 * second + sum_act * third)
    alpha = torch.where(first.detach() != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * torch.relu(first.detach())).sum(dim=(2, 3), keepdim=True)
    exact = (weights * act.detach()).sum(dim=1)
    # The exact weights carry a factor exp(S) > 0; compare up to scale.
    torch.testing.assert_close(out.raw / out.raw.abs().max(), exact / exact.abs().max(), rtol=1e-3, atol=1e-4)


def test_new_methods_leave_nothing_behind(resnet):
    grad_mode = torch.is_grad_enabled()
    GradCAM(resnet, resnet.layer4).attribute(torch.randn(2, 3, 64, 64), contrast=[1, 2],
                                             methods=["gradcam++", "layercam"])
    assert all(not m._forward_hooks for m in resnet.modules())
    assert all(p.grad is None for p in resnet.parameters())
    assert torch.is_grad_enabled() == grad_mode


def test_unknown_method_and_bad_lengths(resnet):
    cam = GradCAM(resnet, get_layer(resnet, "layer4"))
    with pytest.raises(ValueError, match="unknown CAM method"):
        cam.attribute(torch.randn(1, 3, 32, 32), methods=["scorecam"])
    with pytest.raises(ValueError, match="contrasts"):
        cam.attribute(torch.randn(1, 3, 32, 32), contrast=[1, 2])


def test_maps_of_tiny_magnitude_are_still_normalised():
    """Random-weight EfficientNet gives Grad-CAM maps of ~1e-13; they must reach 1 too."""
    from tsexplain.attr.cam import normalize_maps

    maps = torch.tensor([[[9.5e-14, 1.4e-15], [0.0, 0.0]]])
    out = normalize_maps(maps)
    assert out.max() == 1 and out.min() == 0
