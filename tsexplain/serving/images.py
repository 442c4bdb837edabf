"""Image decoding, preprocessing with known geometry, heatmap resizing and overlays."""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import functional as TF

from .errors import RequestError

Size = Union[int, Sequence[int]]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # resize filters, as torchvision's InterpolationMode names them


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB, rotated as its EXIF orientation says.

    16-bit images are scaled to 8 bits; animated images give their first frame.

    Raises ``RequestError`` for bytes that are not a complete image, and for
    images with more than ``max_pixels`` pixels (checked before decoding).
    """
    if not data:
        raise RequestError("the request body is empty: send image bytes", "empty_body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(f"image has {width}x{height} pixels, over the limit of {max_pixels}",
                                   "image_too_large")
            image.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError("the body is not a decodable image", "bad_image") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise RequestError("the image is truncated or corrupt", "bad_image") from None
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to rotate
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit: scale, don't clip
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() copies even RGB


@dataclass(frozen=True)
class CropBox:
    """Where the model's input lies in the original image, in original pixels."""

    left: float
    top: float
    right: float
    bottom: float


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre crop and normalise, as torchvision's transforms do.

    ``resize``: an int resizes the shorter side (aspect kept), a pair ``[h, w]``
    resizes exactly, ``None`` skips; ``interpolation`` is its filter (one of
    :data:`INTERPOLATIONS`, antialiased). ``crop``: an int or ``[h, w]`` centre crop,
    ``None`` skips. :meth:`crop_box` maps the model's input back to the original.
    """

    resize: Size | None = 256
    crop: Size | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(self.geometry(image)), self.mean, self.std)

    def geometry(self, image: Image.Image) -> Image.Image:
        """The resize and centre crop steps, on the PIL image."""
        if self.resize is not None:
            mode = TF.InterpolationMode(self.interpolation)
            image = TF.resize(image, _as_list(self.resize), interpolation=mode, antialias=True)
        if self.crop is not None:
            image = TF.center_crop(image, _as_list(self.crop))
        return image

    def tensors(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, C, H, W]``: images already through :meth:`geometry`, as tensors, normalised.

        The same values, bit for bit, as ``torch.stack([to_tensor, normalize])`` image by
        image (the same float operations in the same order), done once for the batch when
        the images are all 8-bit RGB of one size; image by image otherwise.
        """
        if images and all(i.mode == "RGB" for i in images) and len({i.size for i in images}) == 1:
            dtype = torch.get_default_dtype()
            mean, std = _normalisation(tuple(self.mean), tuple(self.std), dtype)
            pixels = torch.from_numpy(np.stack([np.asarray(i) for i in images]))  # [N, H, W, 3] uint8
            batch = pixels.permute(0, 3, 1, 2).contiguous().to(dtype).div(255)  # to_tensor
            return batch.sub_(mean).div_(std)  # normalize
        return torch.stack([TF.normalize(TF.to_tensor(i), self.mean, self.std) for i in images])

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, computed as torchvision does."""
        if self.resize is None:
            return width, height
        size = _as_list(self.resize)
        if len(size) == 2:
            return size[1], size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size[0], int(size[0] * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the tensor the model sees."""
        if self.crop is None:
            return self.resized_size(width, height)
        crop = _as_list(self.crop)
        return (crop[0], crop[0]) if len(crop) == 1 else (crop[1], crop[0])

    def crop_box(self, width: int, height: int) -> CropBox:
        """The model input's footprint in the original ``width`` x ``height`` image."""
        resized_w, resized_h = self.resized_size(width, height)
        crop_w, crop_h = self.input_size(width, height)
        left = int(round((resized_w - crop_w) / 2.0)) if self.crop is not None else 0
        top = int(round((resized_h - crop_h) / 2.0)) if self.crop is not None else 0
        sx, sy = resized_w / width, resized_h / height
        return CropBox(left / sx, top / sy, (left + crop_w) / sx, (top + crop_h) / sy)


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``[1, C, 1, 1]`` tensors, checked as torchvision's normalize checks them."""
    mean_t, std_t = torch.as_tensor(mean, dtype=dtype), torch.as_tensor(std, dtype=dtype)
    if (std_t == 0).any():
        raise ValueError(f"std evaluated to zero after conversion to {dtype}, leading to division by zero.")
    return mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)


def _as_list(size: Size) -> list[int]:
    return [int(size)] if isinstance(size, int) else [int(s) for s in size]


def resize_map(heatmap: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a non-negative ``[h, w]`` map that keeps its range: bilinear
    interpolation lowers a peak lying between output pixels, so the result is mapped
    linearly back onto the map's own minimum and maximum (a min-max normalised map
    peaks at exactly 1 at every size; a flat map stays flat)."""
    source = heatmap.float()
    resized = F.interpolate(source[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    low, high = float(source.min()), float(source.max())
    got_low, got_high = resized.min(), resized.max()
    if high <= low or got_high <= got_low:
        return torch.full_like(resized, high)
    return (resized - got_low) / (got_high - got_low) * (high - low) + low


def render_overlay(image: Image.Image, heatmap: torch.Tensor, box: CropBox, max_alpha: float = 0.6) -> bytes:
    """PNG of ``heatmap`` drawn over the original ``image`` at its original size.

    The map covers ``box`` (the part of the image the model saw); hot regions are
    red and opaque up to ``max_alpha``, cold regions leave the image visible.
    """
    left, top = int(round(box.left)), int(round(box.top))
    width = max(1, int(round(box.right)) - left)
    height = max(1, int(round(box.bottom)) - top)
    heat = resize_map(heatmap.detach().cpu(), height, width).numpy()
    gray = Image.fromarray((heat * 255).astype(np.uint8), "L")
    colored = ImageOps.colorize(gray, black="#0000c0", mid="#ffff00", white="#ff0000", midpoint=140)
    alpha = Image.fromarray((heat * 255 * max_alpha).astype(np.uint8), "L")
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer.paste(Image.merge("RGBA", (*colored.split(), alpha)), (left, top))
    out = Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
