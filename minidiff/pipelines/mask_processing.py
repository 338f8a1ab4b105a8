"""Images and masks in, tensors out, for inpainting: what diffusers' `VaeImageProcessor` does for the inpaint pipeline.

An inpainting call takes a picture and a mask of the same size; white in the mask (value >= 0.5) means "repaint",
black means "keep". Before the loop both become tensors of the working size (height, width):

    image:  [crop] -> resize (Lanczos) -> RGB floats in [0, 1] -> x * 2 - 1            (B, 3, H, W) in [-1, 1]
    mask:   [crop] -> resize (Lanczos) -> grayscale ("L") -> floats in [0, 1] -> m >= 0.5   (B, 1, H, W) in {0, 1}

`padding_mask_crop=p` works on a smaller picture: `get_crop_region` finds the box around the white pixels,
widens it by p and then to the working aspect ratio; only that box is cropped, resized ("fill" mode: keep the
aspect ratio, pad with stretched edges) and inpainted, and `apply_overlay` pastes the result back into the full
picture, with the original pixels on top wherever the mask is black. `blur` softens a mask's edge (a Gaussian
blur of radius `blur_factor`): with `apply_overlay`, a soft mask blends the new pixels into the old ones.

The rules (which resampling, the order crop -> resize -> grayscale -> binarise, the "fill" padding, the
RGBa-premultiplied paste) are diffusers 0.42.1's, so the same inputs give the same tensors; the code is ours.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

IMAGE_TYPES = (Image.Image, np.ndarray, torch.Tensor)
LATENT_CHANNELS = 4  # an image tensor with 4 channels is already latents: used as it is


def _as_list(image) -> list:
    return list(image) if isinstance(image, list) else [image]


def check_is_image(image, name: str) -> None:
    """Refuse anything but a PIL image, a numpy array, a tensor, or a non-empty list of one kind of these."""
    items = _as_list(image)
    if not items or not all(isinstance(item, IMAGE_TYPES) for item in items):
        kinds = sorted({type(item).__name__ for item in items}) or ["an empty list"]
        raise TypeError(
            f"{name} must be a PIL image, a numpy array, a torch tensor or a list of them, got {', '.join(kinds)}; "
            f"open a file with PIL.Image.open(path) first"
        )


def image_size(image) -> tuple[int, int] | None:
    """(width, height) of a PIL image, an (H, W[, C]) array or a (..., H, W) tensor; None for latents."""
    first = _as_list(image)[0]
    if isinstance(first, Image.Image):
        return first.size
    if isinstance(first, np.ndarray):
        shape = first.shape if first.ndim in (2, 3) and (first.ndim == 2 or first.shape[-1] in (1, 3, 4)) else first.shape[1:]
        return shape[1], shape[0]
    if first.ndim >= 3 and first.shape[-3] == LATENT_CHANNELS:
        return None
    return first.shape[-1], first.shape[-2]


def get_crop_region(mask_image: Image.Image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around the mask's non-black pixels, grown by `pad` on each side (within the
    picture), then grown along one axis to the working aspect ratio width / height, shifted back inside the picture."""
    mask = np.asarray(mask_image.convert("L"))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("padding_mask_crop needs a mask with some white in it: this mask is all black (nothing to repaint)")
    h, w = mask.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(start: int, stop: int, extra: int, limit: int) -> tuple[int, int]:
    """[start, stop) grown by `extra` (half before, half after), then moved back inside [0, limit)."""
    start, stop = start - extra // 2, stop + extra - extra // 2
    if stop >= limit:
        start, stop = start - (stop - limit), limit
    if start < 0:
        start, stop = 0, stop - start
    return start, min(stop, limit)


def blur(image: Image.Image, blur_factor: int = 4) -> Image.Image:
    """A Gaussian blur of radius `blur_factor`: a soft edge for a mask (`pipe.mask_processor.blur(mask, 33)`)."""
    return image.filter(ImageFilter.GaussianBlur(blur_factor))


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit `image` inside width x height keeping its aspect ratio, centred; the empty bands are filled by
    stretching the image's first and last row (or column) of pixels."""
    ratio, source_ratio = width / height, image.width / image.height
    new_w = width if ratio < source_ratio else image.width * height // image.height
    new_h = height if ratio >= source_ratio else image.height * width // image.width
    resized = image.resize((new_w, new_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - new_w // 2, height // 2 - new_h // 2))
    if ratio < source_ratio:
        band = height // 2 - new_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)), box=(0, band + new_h))
    elif ratio > source_ratio:
        band = width // 2 - new_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)), box=(band + new_w, 0))
    return out


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover width x height keeping the aspect ratio, centred; what overflows is cut off."""
    ratio, source_ratio = width / height, image.width / image.height
    new_w = width if ratio > source_ratio else image.width * height // image.height
    new_h = height if ratio <= source_ratio else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(image.resize((new_w, new_h), resample=Image.LANCZOS), box=(width // 2 - new_w // 2, height // 2 - new_h // 2))
    return out


class VaeImageProcessor:
    """Pictures <-> tensors for the VAE, as diffusers' VaeImageProcessor (the parts inpainting uses).

    The image processor normalises to [-1, 1]; the mask processor (`do_normalize=False, do_binarize=True,
    do_convert_grayscale=True`) gives one channel of 0s and 1s."""

    def __init__(self, vae_scale_factor: int = 8, do_normalize: bool = True, do_binarize: bool = False,
                 do_convert_grayscale: bool = False):
        self.vae_scale_factor = vae_scale_factor
        self.do_normalize = do_normalize
        self.do_binarize = do_binarize
        self.do_convert_grayscale = do_convert_grayscale

    get_crop_region = staticmethod(get_crop_region)
    blur = staticmethod(blur)

    def default_height_width(self, size: tuple[int, int], height: int | None, width: int | None) -> tuple[int, int]:
        """The picture's own size where none is given, cut down to multiples of the VAE's factor."""
        width, height = width or size[0], height or size[1]
        return height - height % self.vae_scale_factor, width - width % self.vae_scale_factor

    def resize(self, image, height: int, width: int, resize_mode: str = "default"):
        """PIL: Lanczos to (width, height), or "fill" / "crop" keeping the aspect ratio; tensors: nearest neighbour."""
        if isinstance(image, Image.Image):
            if resize_mode == "fill":
                return resize_and_fill(image, width, height)
            if resize_mode == "crop":
                return resize_and_crop(image, width, height)
            return image.resize((width, height), resample=Image.LANCZOS)
        if resize_mode != "default":
            raise ValueError(f"resize_mode {resize_mode!r} needs a PIL image, got {type(image).__name__}")
        return torch.nn.functional.interpolate(image, size=(height, width))

    def preprocess(self, image, height: int | None = None, width: int | None = None, resize_mode: str = "default",
                   crops_coords: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """PIL image(s), (H, W[, C]) / (B, H, W, C) arrays in [0, 1], or (C, H, W) / (B, C, H, W) tensors in [0, 1]
        -> a float32 (B, C, height, width) tensor: [-1, 1] for images, {0, 1} for masks."""
        check_is_image(image, "image")
        if self.do_convert_grayscale and isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 3:
            # a 3-D mask is (B, H, W) or (H, W, 1): add the channel axis
            if isinstance(image, torch.Tensor):
                image = image.unsqueeze(1)
            else:
                image = image[None] if image.shape[-1] == 1 else image[..., None]
        images = _as_list(image)
        if isinstance(images[0], Image.Image):
            if crops_coords is not None:
                images = [item.crop(crops_coords) for item in images]
            height, width = self.default_height_width(images[0].size, height, width)
            images = [self.resize(item, height, width, resize_mode) for item in images]
            mode = "L" if self.do_convert_grayscale else None
            arrays = [np.asarray(item.convert(mode) if mode else item, dtype=np.float32) / 255.0 for item in images]
            tensor = _numpy_to_pt(np.stack(arrays))
        elif isinstance(images[0], np.ndarray):
            tensor = _numpy_to_pt(np.concatenate(images) if images[0].ndim == 4 else np.stack(images))
            height, width = self.default_height_width((tensor.shape[3], tensor.shape[2]), height, width)
            tensor = self.resize(tensor, height, width)
        else:
            tensor = torch.cat(images) if images[0].ndim == 4 else torch.stack(images)
            if self.do_convert_grayscale and tensor.ndim == 3:
                tensor = tensor.unsqueeze(1)
            if tensor.shape[1] == LATENT_CHANNELS:
                return tensor
            height, width = self.default_height_width((tensor.shape[3], tensor.shape[2]), height, width)
            tensor = self.resize(tensor, height, width)
        normalize = self.do_normalize
        if normalize and tensor.min() < 0:
            warnings.warn(
                "Passing `image` as torch tensor with value range in [-1,1] is deprecated. The expected value range for "
                f"image tensor is [0,1] when passing as pytorch tensor or numpy Array. You passed `image` with value "
                f"range [{tensor.min()},{tensor.max()}]",
                FutureWarning,
                stacklevel=2,
            )
            normalize = False
        if normalize:
            tensor = tensor * 2.0 - 1.0
        if self.do_binarize:
            tensor = (tensor >= 0.5).to(tensor.dtype)
        return tensor

    def apply_overlay(self, mask: Image.Image, init_image: Image.Image, image: Image.Image,
                      crop_coords: tuple[int, int, int, int] | None = None) -> Image.Image:
        """Paste the generated `image` back (into `crop_coords` of the original, if given) and lay the original
        pixels over it where the mask is black, so the kept region comes back exactly (a soft mask blends)."""
        width, height = init_image.size
        kept = Image.new("RGBa", (width, height))  # premultiplied alpha: the original, opaque where the mask is black
        kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
        kept = kept.convert("RGBA")
        if crop_coords is not None:
            x1, y1, x2, y2 = crop_coords
            canvas = Image.new("RGBA", (width, height))
            canvas.paste(self.resize(image, height=y2 - y1, width=x2 - x1, resize_mode="crop"), (x1, y1))
            image = canvas.convert("RGB")
        image = image.convert("RGBA")
        image.alpha_composite(kept)
        return image.convert("RGB")


def _numpy_to_pt(images: np.ndarray) -> torch.Tensor:
    """(B, H, W[, C]) numpy -> (B, C, H, W) torch."""
    images = images[..., None] if images.ndim == 3 else images
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
