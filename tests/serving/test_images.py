"""Decoding, preprocessing geometry and overlays."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tsexplain.serving.errors import RequestError
from tsexplain.serving.images import Preprocessing, decode_image, render_overlay
from tsexplain.serving.schema import decode_base64


def png_bytes(image, fmt="PNG", **save):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (224, 224), (97, 211)])
def test_preprocessing_matches_torchvision(size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    stock = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    torch.testing.assert_close(Preprocessing()(image), stock(image))


@pytest.mark.parametrize("prep", [Preprocessing(), Preprocessing(64, 64), Preprocessing([90, 70], [61, 47])])
def test_batch_tensors_are_the_image_by_image_tensors_bit_for_bit(prep):
    """The handler converts a batch at once (Preprocessing.tensors); the values must be those of
    Preprocessing.__call__ image by image, exactly, and laid out as torch.stack lays them out."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((640, 480), (300, 500), (97, 211))]
    batch = prep.tensors([prep.geometry(i) for i in images])
    alone = torch.stack([prep(i) for i in images])
    assert batch.dtype == alone.dtype and batch.shape == alone.shape and batch.is_contiguous()
    assert torch.equal(batch, alone)
    gray = [Image.new("L", (8, 8), 40), Image.new("L", (8, 8), 90)]  # not RGB: image by image
    one = Preprocessing(None, None, (0.5,), (0.25,))
    assert torch.equal(one.tensors(gray), torch.stack([one(i) for i in gray]))


@pytest.mark.parametrize("size,resize,crop", [((640, 480), 256, 224), ((300, 500), 128, 112), ((200, 90), [64, 64], None)])
def test_crop_box_maps_model_input_back_to_the_original(size, resize, crop):
    """A bright square placed by the crop box lands in the middle of the model input."""
    prep = Preprocessing(resize, crop, (0, 0, 0), (1, 1, 1))
    box = prep.crop_box(*size)
    # Paint the box's central quarter in the original; check where it lands in the input.
    image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    cx0 = int(box.left + (box.right - box.left) * 0.375)
    cx1 = int(box.left + (box.right - box.left) * 0.625)
    cy0 = int(box.top + (box.bottom - box.top) * 0.375)
    cy1 = int(box.top + (box.bottom - box.top) * 0.625)
    image[cy0:cy1, cx0:cx1] = 255
    tensor = prep(Image.fromarray(image))[0]
    h, w = tensor.shape
    ys, xs = torch.nonzero(tensor > 0.5, as_tuple=True)
    assert abs(ys.float().mean().item() - (h - 1) / 2) <= 1.5
    assert abs(xs.float().mean().item() - (w - 1) / 2) <= 1.5
    assert abs((ys.max() - ys.min() + 1).item() - h / 4) <= 2


def test_overlay_is_original_size_and_hot_where_the_map_is():
    image = Image.new("RGB", (320, 240), (90, 90, 90))
    prep = Preprocessing(64, 64)
    heatmap = torch.zeros(8, 8)
    heatmap[0:2, 6:8] = 1.0  # top-right corner of the model's view
    png = render_overlay(image, heatmap, prep.crop_box(320, 240))
    out = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert out.shape == (240, 320, 3)
    box = prep.crop_box(320, 240)
    hot = out[int(box.top) + 5, int(box.right) - 5]
    cold = out[int(box.bottom) - 5, int(box.left) + 5]
    assert hot[0] - hot[2] > 80  # red where the map is hot
    assert np.abs(cold - 90).max() <= 3  # untouched where it is cold
    assert np.abs(out[120, 5] - 90).max() <= 3  # outside the crop: untouched


def test_decode_rotates_exif_and_converts_modes():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    decoded = decode_image(png_bytes(image, "JPEG", exif=exif), 10_000)
    assert decoded.size == (20, 40) and decoded.mode == "RGB"
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        assert decode_image(png_bytes(Image.new(mode, (8, 8)), fmt), 10_000).mode == "RGB"
    pixels = np.random.default_rng(2).integers(0, 255, (12, 20, 3), dtype=np.uint8)  # RGB: decoded as is
    np.testing.assert_array_equal(np.asarray(decode_image(png_bytes(Image.fromarray(pixels)), 10_000)), pixels)


def test_sixteen_bit_is_scaled_and_animation_gives_first_frame():
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    decoded = np.asarray(decode_image(png_bytes(Image.fromarray(ramp)), 10_000))
    np.testing.assert_allclose(decoded[..., 0].astype(float), ramp / 257.0, atol=1.0)
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    first = np.asarray(decode_image(gif.getvalue(), 10_000))
    assert first[0, 0, 0] > 200 and first[0, 0, 1] < 50


@pytest.mark.parametrize("data,kind", [(b"", "empty_body"), (b"not an image", "bad_image")])
def test_decode_errors(data, kind):
    with pytest.raises(RequestError) as info:
        decode_image(data, 10_000)
    assert info.value.kind == kind and info.value.status == 400


def test_truncated_and_oversized_images():
    data = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(RequestError, match="truncated|decodable"):
        decode_image(data[: len(data) // 2], 10_000)
    with pytest.raises(RequestError) as info:
        decode_image(png_bytes(Image.new("RGB", (200, 200))), 10_000)
    assert info.value.status == 413 and "200x200" in info.value.message


def test_base64_variants():
    raw = bytes(range(256))
    assert decode_base64(base64.b64encode(raw).decode()) == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert decode_base64("data:image/png;base64," + base64.b64encode(raw).decode()) == raw
    with pytest.raises(RequestError, match="base64"):
        decode_base64("@@@ not base64 @@@")
