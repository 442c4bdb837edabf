"""The automatic layer choice proven on trained transformers: for each family (timm ViT
and Swin, Hugging Face ViT and Swin, the HF ones wrapped as served), a tiny model
trained briefly on the synthetic shapes (tests/trained_families.py; cached in
build/layer_families, trained on the first run: see its timings in the README) gets
its known-good layer, Grad-CAM there points at the object on held-out images far
above chance, and the wrong-but-plausible layers are refused at load: their maps,
forced through, point no better than chance or are flat. A Swin's last stage output and
final norm pass the checks, and point less often than the chosen layer.

Chance: a peak placed uniformly at random lands in the object's box with
probability mean(box area) / image area, computed on the same images (0.211).
"""
import pytest
import torch

from trained_families import RECIPES, shapes_batch, trained
from tsexplain.attr.cam import GradCAM
from tsexplain.attr.layer_choice import LayerChoiceError, choose_layer, probe_input
from tsexplain.attr.layers import get_layer
from tsexplain.tools.evaluation import pointing_hit

HELD_OUT_SEED = 424243  # differs from the training (0) and validation (1) seeds

# family: (known-good layer, layout, prefix tokens, [(wrong-but-plausible layer, why it is refused)])
EXPECTED = {
    "timm_vit": ("blocks.2.norm1", "tokens", 1, [("norm", "cells get no gradient"),
                                                  ("blocks.2", "cells get no gradient"),
                                                  ("blocks.2.attn.k_norm", "not a spatial grid")]),
    "timm_swin": ("layers.1.blocks.0.norm1", "nhwc", 0, [("head.global_pool", "not a spatial grid")]),
    "hf_vit": ("model.vit.layers.2.layernorm_before", "tokens", 1, [("model.vit.layernorm", "cells get no gradient")]),
    "hf_swin": ("model.swin.encoder.layers.1.blocks.0.layernorm_before", "tokens", 0,
                # the stages answer (hidden states, hidden states as [N, C, h, w], attention) in
                # transformers 5.23; the pooler's [N, C, 1] is one vector, not C one-channel tokens
                [("model.swin.encoder.layers.1", "not a tensor"), ("model.swin.pooler", "not a spatial grid")]),
}
# Spatial layers that pass the checks but were not chosen (Swin: timm's last stage output, the final
# norm): the chosen layer points at the object more often on the same images.
COMPARED = {"timm_swin": ["layers.1", "norm"], "hf_swin": ["model.swin.layernorm"]}


def pointing(model, layer_name, layout, inputs, boxes, size):
    out = GradCAM(model, get_layer(model, layer_name), layout).attribute(inputs)
    hits = sum(pointing_hit(heatmap, box, size, size) for heatmap, box in zip(out.heatmaps, boxes))
    return hits / len(boxes), out


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_known_good_layer_points_at_the_object_and_wrong_layers_are_refused(family):
    if family.startswith("timm"):
        pytest.importorskip("timm", reason="timm (the optional extra `timm`) is not installed")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model, record = trained(family)
    size = RECIPES[family]["size"]
    name, layout, prefix, wrong = EXPECTED[family]
    example = probe_input(size, size)

    grid = choose_layer(model, example)
    assert (grid.name, grid.layout, grid.prefix_tokens) == (name, layout, prefix)

    inputs, labels, boxes = shapes_batch(300, HELD_OUT_SEED, size)
    chance = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) / len(boxes) / (size * size)
    rate, out = pointing(model, grid.name, grid, inputs, boxes, size)
    accuracy = float((out.logits.argmax(1) == labels).float().mean())
    print(f"{family}: {grid}, localisation {grid.localisation}; trained {record['seconds']} s "
          f"(cached: {record['cached']}); held-out accuracy {accuracy:.3f}, pointing {rate:.3f}, chance {chance:.3f}")
    assert chance < 0.3
    assert rate >= 0.6 and rate >= chance + 0.35

    for layer in COMPARED.get(family, []):
        other, _ = pointing(model, layer, choose_layer(model, example, layer), inputs, boxes, size)
        print(f"{family}: {layer} pointing {other:.3f}")
        assert rate > other
    for layer, why in wrong:
        with pytest.raises(LayerChoiceError, match=why):
            choose_layer(model, example, layer)
    # The refusals matter: the last block's own output, read as before (one class token,
    # square grid), gives maps that carry nothing (flat) or point no better than chance.
    if layout == "tokens" and family.endswith("vit"):
        after = wrong[1][0] if family == "timm_vit" else wrong[0][0]
        forced, forced_out = pointing(model, after, "tokens", inputs, boxes, size)
        print(f"{family}: {after} forced: max {float(forced_out.heatmaps.abs().max()):.3g}, pointing {forced:.3f}")
        assert float(forced_out.heatmaps.abs().max()) == 0 or forced <= chance + 0.1
