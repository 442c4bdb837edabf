"""Choosing and proving the explained layer (tsexplain.attr.layer_choice): grid shapes,
prefix tokens, the known-good layers of timm and Hugging Face families (wrappers
seen through), and the refusals: non-spatial outputs, layers whose cells get no
gradient, grids whose axes do not follow the image. Models are small, random-weight
configurations; the trained ones that check where the maps point are in
tests/tools/test_layer_pointing.py."""
import random

import pytest
import torch
import torchvision
from torch import nn

from cam_reference import reference_maps
from tsexplain.attr.cam import GradCAM
from tsexplain.attr.layer_choice import (LayerChoiceError, candidate_layers, choose_layer, grid_shaped_layers,
                                         inspect_layer, probe_input)
from tsexplain.attr.layers import LayerGrid, get_layer, known_layer, spatial_grids, tokens_to_grid


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm", reason="timm (the optional extra `timm`) is not installed")


class Wrapper(nn.Module):
    """A model kept as ``.model`` (as serving's LogitsOnly keeps Hugging Face models)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values) if hasattr(self.model, "config") else self.model(pixel_values)
        return out.logits if hasattr(out, "logits") else out


def tiny_timm_vit(timm, size=32, **kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=size,
                             **{"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2, **kw}).eval()


# -- shapes alone --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,size,layout,expected", [
    ((1, 512, 7, 7), (224, 224), "nchw", [(7, 7, 512, 0)]),
    ((1, 7, 7, 768), (224, 224), "nhwc", [(7, 7, 768, 0)]),
    ((1, 512, 7, 10), (224, 320), "nchw", [(7, 10, 512, 0)]),  # a wide input: a wide grid
    ((1, 8, 14, 18), (16, 20), "nchw", [(14, 18, 8, 0)]),  # an unpadded 3x3 conv loses borders
    ((1, 2048, 8, 8), (299, 299), "nchw", [(8, 8, 2048, 0)]),  # Inception v3's Mixed_7c
    ((1, 197, 768), (224, 224), "tokens", [(14, 14, 768, 1)]),  # ViT-B/16: class token
    ((1, 198, 192), (224, 224), "tokens", [(14, 14, 192, 2)]),  # DeiT distilled: class + distillation
    ((1, 69, 32), (32, 32), "tokens", [(8, 8, 32, 5)]),  # 4 register tokens
    ((1, 49, 768), (224, 224), "tokens", [(7, 7, 768, 0)]),  # Swin's last stage as tokens
    ((1, 81, 64), (128, 160), "tokens", [(8, 10, 64, 1)]),  # a non-square patch grid
])
def test_grid_shapes(shape, size, layout, expected):
    assert spatial_grids(shape, size, layout)[:1] == expected


@pytest.mark.parametrize("shape,size", [
    ((1, 3, 65, 64), (64, 64)),  # the issue's timm ViT attention keys [N, heads, tokens, head_dim]
    ((1, 6, 65, 64), (128, 128)),
    ((1, 12, 197, 64), (224, 224)),
    ((1, 512, 1, 1), (224, 224)),  # after global pooling: one cell
    ((1, 512, 10, 7), (224, 320)),  # taller than wide from a wide input
    ((1, 512), (224, 224)),
])
def test_non_spatial_shapes_are_no_grid(shape, size):
    assert all(spatial_grids(shape, size, layout) == [] for layout in ("nchw", "nhwc")), shape
    assert all(g[3] > 0 or len(shape) == 3 for g in spatial_grids(shape, size, "tokens"))
    if len(shape) != 3:
        assert spatial_grids(shape, size, "tokens") == []


def test_a_pooled_vector_is_no_tokens():
    # Hugging Face Swin's pooler: [N, C, 1], whose 64 values would read as 8x8 one-channel tokens
    assert spatial_grids((1, 64, 1), (64, 64), "tokens") == []
    assert spatial_grids((1, 64, 2), (64, 64), "tokens")[:1] == [(8, 8, 2, 0)]


def test_every_conv_stack_output_is_a_grid_of_its_input():
    """Strided, padded and unpadded convolutions, poolings and patch embeddings, stacked at
    random on random input sizes: the rule accepts every output shape they give."""
    rng = random.Random(0)

    def op():
        kind = rng.random()
        if kind < 0.5:
            k = rng.choice([1, 3, 5, 7])
            return k, rng.choice([1, 1, 2]), rng.choice([k // 2, 0])
        if kind < 0.8:
            k = rng.choice([2, 3])
            return k, 2, rng.choice([0, k // 2])
        k = rng.choice([2, 4, 8, 16])
        return k, k, 0

    checked = 0
    for _ in range(3000):
        height, width = rng.randint(8, 400), rng.randint(8, 400)
        h, w = height, width
        for k, s, p in [op() for _ in range(rng.randint(1, 8))]:
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if h >= 1 and w >= 1 and h * w > 1:
            checked += 1
            assert spatial_grids((1, 8, h, w), (height, width), "nchw") == [(h, w, 8, 0)], (height, width, h, w)
    assert checked > 1000


def test_tokens_to_grid_drops_the_prefix_and_keeps_row_order():
    tokens = torch.arange(2 * (3 + 2 * 4) * 5, dtype=torch.float32).reshape(2, 3 + 2 * 4, 5)
    grid = tokens_to_grid(tokens, prefix_tokens=3, grid=(2, 4))
    assert grid.shape == (2, 5, 2, 4)
    assert torch.equal(grid[1, :, 1, 2], tokens[1, 3 + 1 * 4 + 2])
    assert torch.equal(tokens_to_grid(tokens[:, 2:], 1, (2, 4)), grid)
    square = torch.randn(1, 1 + 9, 4)
    assert torch.equal(tokens_to_grid(square)[0, :, 2, 1], square[0, 1 + 2 * 3 + 1])  # default: 1 class token, square
    with pytest.raises(TypeError, match="do not form a 2x3 grid"):
        tokens_to_grid(tokens, 3, (2, 3))


# -- known-good layers ---------------------------------------------------------------------------

def test_timm_families_get_their_known_good_layer(timm):
    x32, x64 = probe_input(32, 32), probe_input(64, 64)
    vit = tiny_timm_vit(timm)
    assert choose_layer(vit, x32) == LayerGrid("blocks.1.norm1", "tokens", 8, 8, 32, 1, choose_layer(vit, x32).localisation)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, img_size=32,
                             patch_size=4, depth=2).eval()
    assert (choose_layer(deit, x32).name, choose_layer(deit, x32).prefix_tokens) == ("blocks.1.norm1", 2)
    registers = tiny_timm_vit(timm, reg_tokens=4)
    assert choose_layer(registers, x32).prefix_tokens == 5
    wide = tiny_timm_vit(timm, size=(32, 48))
    assert (choose_layer(wide, probe_input(32, 48)).height, choose_layer(wide, probe_input(32, 48)).width) == (8, 12)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, img_size=64, window_size=4,
                             depths=(1, 1, 1), num_heads=(1, 2, 4), embed_dim=16).eval()
    grid = choose_layer(swin, x64)
    assert (grid.name, grid.layout, grid.height, grid.width) == ("layers.2.blocks.0.norm1", "nhwc", 4, 4)
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=5, output_stride=8).eval()
    grid = choose_layer(convnext, x32)
    assert (grid.name, grid.layout, grid.height) == ("stages.3", "nchw", 4)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    assert choose_layer(resnet, x64).name == "layer4"


def test_hugging_face_families_get_their_known_good_layer_through_a_wrapper():
    from transformers import (ConvNextConfig, ConvNextForImageClassification, DeiTConfig,
                              DeiTForImageClassificationWithTeacher, ResNetConfig, ResNetForImageClassification,
                              SwinConfig, SwinForImageClassification, ViTConfig, ViTForImageClassification)

    x32 = probe_input(32, 32)
    vit_config = dict(image_size=32, patch_size=4, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                      intermediate_size=64, num_labels=5)
    expected = {
        "vit": (ViTForImageClassification(ViTConfig(**vit_config)), "model.vit.layers.1.layernorm_before", "tokens", 1),
        "deit": (DeiTForImageClassificationWithTeacher(DeiTConfig(**vit_config)),
                 "model.deit.layers.1.layernorm_before", "tokens", 2),
        "swin": (SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                       num_heads=[1, 2], window_size=4, num_labels=5)),
                 "model.swin.encoder.layers.1.blocks.0.layernorm_before", "tokens", 0),
        "convnext": (ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                                   num_labels=5)),
                     "model.convnext.encoder.stages.1", "nchw", 0),
        "resnet": (ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                             layer_type="basic", num_stages=2, num_labels=5)),
                   "model.resnet.encoder.stages.1", "nchw", 0),
    }
    for family, (model, name, layout, prefix) in expected.items():
        grid = choose_layer(Wrapper(model).eval(), x32)
        assert (grid.name, grid.layout, grid.prefix_tokens) == (name, layout, prefix), family
        assert grid.height == grid.width == 4 if family in ("swin", "convnext", "resnet") else 8


def test_a_shared_module_is_named_where_the_model_registers_it(timm):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_timm_vit(timm)
            self.blocks = self.net.blocks  # the same modules under a second name

        def forward(self, x):
            return self.net(x)

    name, layout = known_layer(Net())
    assert (name, layout) == ("net.blocks.1.norm1", "tokens")
    assert get_layer(Net(), name) is not None


# -- refusals ------------------------------------------------------------------------------------

def test_the_issues_attention_keys_are_refused_with_the_candidates(timm):
    model = tiny_timm_vit(timm, size=64, patch_size=8)
    with pytest.raises(LayerChoiceError, match=r"'blocks.1.attn.k_norm' is not a spatial grid: it outputs \[1, 2, 65, 16\]") as caught:
        choose_layer(model, probe_input(64, 64), "blocks.1.attn.k_norm")
    assert "blocks.1.norm1 (tokens, 1 prefix token, 8x8 cells, 32 channels)" in str(caught.value)
    assert any(c.name == "blocks.1.norm1" for c in caught.value.candidates)


def test_attention_probabilities_are_refused(timm):
    """[1, heads, 65, 65] from a 128 px input passes for a grid by shape (unpadded
    convolutions lose borders) and, untrained, is barely local on either axis: its
    rows summing to one give it away."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, depth=2, embed_dim=32,
                              num_heads=2, img_size=128).eval()
    model.blocks[1].attn.fused_attn = False  # so the probabilities are the output of a module (attn_drop)
    assert spatial_grids((1, 2, 65, 65), (128, 128), "nchw")
    with pytest.raises(ValueError, match="probability distributions"):
        inspect_layer(model, "blocks.1.attn.attn_drop", probe_input(128, 128))


def test_tokens_in_reading_order_are_refused(timm):
    """Keys [1, 6, 64, 64] of a ViT-S/16 without a class token at 128 px are a 64x64 grid
    by shape; their rows are tokens in reading order, whose input moves down and sideways
    alike, and their columns features of one token."""
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=5, img_size=128, depth=2,
                              class_token=False, global_pool="avg").eval()
    example = probe_input(128, 128)
    assert spatial_grids((1, 6, 64, 64), (128, 128), "nchw")
    with pytest.raises(ValueError, match="as tokens in reading order do"):
        inspect_layer(model, "blocks.1.attn.k_norm", example, "nchw")
    assert inspect_layer(model, "blocks.1.norm1", example).prefix_tokens == 0


def test_layers_after_the_class_token_is_taken_are_refused(timm):
    model = tiny_timm_vit(timm)
    for name in ("norm", "blocks.1"):  # only the class token reaches the head from here
        with pytest.raises(ValueError, match="cells get no gradient"):
            inspect_layer(model, name, probe_input(32, 32))
    assert inspect_layer(model, "blocks.0", probe_input(32, 32)).height == 8  # block 1's attention mixes it


class Transposed(nn.Module):
    def forward(self, x):
        return x.transpose(2, 3)


def small_cnn(*middle):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), *middle,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_a_transposed_map_is_refused_and_the_plain_one_kept():
    torch.manual_seed(0)
    model = small_cnn(Transposed())
    example = probe_input(16, 16)
    with pytest.raises(ValueError, match="its rows do not run down the input"):
        inspect_layer(model, "3", example)
    grid = inspect_layer(model, "2", example)
    assert grid.localisation[0] > 0.5 and grid.localisation[1] > 0.5


def test_outputs_that_are_no_tensor_did_not_run_or_do_not_reach_the_logits_are_refused():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused, self.detached = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            a = self.used(x).mean((2, 3))
            b = self.detached(x).detach().mean((2, 3))
            return self.head(torch.cat([a, b], 1))

    model, example = Branches().eval(), probe_input(8, 8)
    with pytest.raises(ValueError, match="did not run"):
        inspect_layer(model, "unused", example)
    with pytest.raises(ValueError, match="do not depend on its output"):
        inspect_layer(model, "detached", example)
    assert inspect_layer(model, "used", example).height == 6


def test_a_model_without_a_spatial_layer_fails_listing_no_candidates():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(LayerChoiceError, match="no layer with a spatial feature map.*no layer outputs a grid") as caught:
        choose_layer(model, probe_input(2, 2))
    assert caught.value.candidates == []


def test_an_unknown_vit_like_model_gets_a_proven_layer_not_the_keys(timm):
    """The issue's case without the family table: the scan refuses the last block's
    outputs (no gradient to the patch tokens) and the attention keys (no grid)."""
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            vit = tiny_timm_vit(timm)
            self.embed, self.cls, self.pos, self.layers, self.norm, self.out = (
                vit.patch_embed, vit.cls_token, vit.pos_embed, vit.blocks, vit.norm, vit.head)

        def forward(self, x):
            tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos
            return self.out(self.norm(self.layers(tokens))[:, 0])

    model = Mine().eval()
    grid = choose_layer(model, probe_input(32, 32))
    assert (grid.layout, grid.prefix_tokens, grid.height, grid.width) == ("tokens", 1, 8, 8)
    assert grid.name.startswith("layers.1.") and "norm2" not in grid.name and "k_norm" not in grid.name
    assert grid == candidate_layers(model, probe_input(32, 32))[0]
    assert grid.name in [c.name for c in grid_shaped_layers(model, probe_input(32, 32))]


def test_forced_layouts_are_checked_too(timm):
    model = tiny_timm_vit(timm)
    with pytest.raises(LayerChoiceError, match="nchw: expected 4 dimensions"):
        choose_layer(model, probe_input(32, 32), None, "nchw")
    assert choose_layer(model, probe_input(32, 32), "blocks.1.norm1", "tokens").prefix_tokens == 1


def test_the_probe_leaves_nothing_behind_and_runs_under_inference_mode():
    model = torchvision.models.resnet18(num_classes=3).eval()
    with torch.inference_mode():
        example = probe_input(64, 64)
        grid = choose_layer(model, example)
    assert grid.name == "layer4"
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# -- the grid feeds the maps ---------------------------------------------------------------------

def test_gradcam_on_a_distilled_vit_drops_both_prefix_tokens(timm):
    """Grad-CAM with the inspected grid equals the plain reference that drops the class and
    distillation tokens (the old one-class-token reading could not even reshape 66 tokens)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, img_size=32,
                              patch_size=4, depth=2).eval()
    nn.init.normal_(model.head.weight, std=0.5)
    nn.init.normal_(model.head_dist.weight, std=0.5)
    grid = choose_layer(model, probe_input(32, 32))
    inputs = torch.randn(2, 3, 32, 32)
    out = GradCAM(model, get_layer(model, grid.name), grid).attribute(inputs, [1, 3])

    def reshape(t):
        return t[:, 2:, :].reshape(t.shape[0], 8, 8, t.shape[2]).permute(0, 3, 1, 2)

    _logits, raw, _maps = reference_maps("gradcam", model, grid.name, inputs, [1, 3], reshape=reshape)
    torch.testing.assert_close(out.raw, raw, rtol=1e-3, atol=1e-5)
    with pytest.raises(TypeError):
        GradCAM(model, get_layer(model, grid.name), "tokens").attribute(inputs, [1, 3])
