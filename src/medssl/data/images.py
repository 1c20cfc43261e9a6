"""Image files -> uint8 RGB arrays, the same way for data folders, `medssl predict` and `medssl serve`.

- 16-bit and 32-bit integer images are scaled to 8 bits (PIL's own conversion clips them to white);
  palette, grey, grey+alpha and RGBA images become RGB; float images are refused.
- Images over MAX_PIXELS are refused before they are decoded.
- `fit` makes a square model input from any image: `reject` (non-square is an error), `crop` (the centre
  square) or `stretch` (MedMNIST's convention: DermaMNIST was resized from 600x450 photographs).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medssl.errors import DataError, ImageReadError, UsageError

MAX_PIXELS = 64_000_000          # ~8000 x 8000; dermoscopes and ISIC images are well below
FITS = ("reject", "crop", "stretch")
SQUARE_TOLERANCE = 0.02          # aspect ratios within 2 % of 1 count as square


def open_rgb(path: str | Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB. Raises ImageReadError naming the file and the reason."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own guard, at our limit (ours below names the size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageReadError(f"{path}: {w}x{h} pixels ({w * h / 1e6:.0f} Mpx) is over the limit of "
                                         f"{MAX_PIXELS / 1e6:.0f} Mpx; downscale it first")
                return to_rgb(im, path)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses in open(), before our check
        px = int("".join(c for c in str(e).split("pixels")[0] if c.isdigit()) or 0)
        raise ImageReadError(f"{path}: {px / 1e6:.0f} Mpx is over the limit of {MAX_PIXELS / 1e6:.0f} Mpx; "
                             f"downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from None


def to_rgb(im, path="image") -> np.ndarray:
    """A PIL image in any common mode -> (H, W, 3) uint8."""
    mode = im.mode
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I (32-bit): scale the bit depth, do not clip
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if "16" in mode or a.max(initial=0) <= 65535 else float(2**32 - 1)
        if a.min(initial=0) < 0:
            raise ImageReadError(f"{path}: {mode} image with negative values")
        a = np.rint(a * (255.0 / top)).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "F":
        raise ImageReadError(f"{path}: floating-point image (mode F); save it as 8- or 16-bit PNG/JPEG")
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def fit_image(img: np.ndarray, size: tuple[int, int], fit: str = "reject", name: str = "image") -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C) uint8 at `size` (bicubic); non-square inputs follow `fit`."""
    from PIL import Image

    if img.ndim == 3 and img.shape[-1] == 1:  # grey: PIL takes it without the channel axis
        return fit_image(img[..., 0], size, fit, name)[..., None]
    if fit not in FITS:
        raise UsageError(f"fit must be one of {FITS}, got {fit!r}")
    H, W = img.shape[:2]
    h, w = size
    if abs(H * w - W * h) > SQUARE_TOLERANCE * max(H * w, W * h):  # aspect ratio differs from the model's
        if fit == "reject":
            raise ImageReadError(f"{name}: {W}x{H} does not have the model input's shape ({w}x{h}); "
                                 f"choose how to fit it: --fit crop (centre) or --fit stretch (as MedMNIST)")
        if fit == "crop":
            side_h, side_w = (H, round(H * w / h)) if W * h > H * w else (round(W * h / w), W)
            top, left = (H - side_h) // 2, (W - side_w) // 2
            img = img[top : top + side_h, left : left + side_w]
    if img.shape[:2] == (h, w):
        return np.ascontiguousarray(img)
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8)


LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, PIL's convert("L")


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(..., C) uint8 -> (..., channels) uint8: grey repeated into RGB, RGB to grey by luma (as PIL's "L")."""
    if x.shape[-1] == channels:
        return x
    if channels == 3 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    if channels == 1 and x.shape[-1] == 3:
        return np.clip(np.rint(x.astype(np.float32) @ LUMA), 0, 255).astype(np.uint8)[..., None]
    raise DataError(f"cannot turn {x.shape[-1]}-channel images into {channels}-channel ones")


def read_image(path: str | Path, size: tuple[int, int], fit: str = "reject", channels: int = 3) -> np.ndarray:
    """An image file -> (h, w, channels) uint8 at `size` (grey models get the luma of a colour file)."""
    return to_channels(fit_image(open_rgb(path), size, fit, str(path)), channels)
