"""Reading a scan as the model sees it: any image file (8/16-bit, palette, RGBA) in, ``[1, S, S]`` float32 out.

``imread_tool`` reads a file as grayscale uint8, ``to_model_input``
normalizes (``module/data/preprocess.py``), inverts and resizes it, and
``load_signature`` does both for one file. Errors name the file.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch
from PIL import Image

from module.data.preprocess import BlankScanError, normalize_image

__all__ = ["CACHE_VERSION", "MODES", "ImageReadError", "bit_depth", "imread_tool", "load_signature", "prepare_file",
           "to_8_bits", "to_model_input", "to_tensor"]

MODES = ("normalized", "raw")
# Bump when the preprocessing changes, so cached images and stored features of the old kind are not reused.
CACHE_VERSION = "2"  # 2: 16-bit scans scaled by their bit depth, not their range


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


def bit_depth(values: np.ndarray) -> int:
    """The bit depth a grayscale scan's values were recorded with: 8, 12, 16 or 32 (integers); floats count as
    8 bits when they lie in [0, 255] (or as 8-bit fractions in [0, 1], see ``to_8_bits``).

    A 16-bit file holds either a 16-bit scan (paper near 65535) or a 12-bit scanner's values (at most 4095);
    telling them apart by the largest value is safe because paper is the brightest thing on a scan.
    """
    high = float(values.max()) if values.size else 0.0
    for depth in (8, 12, 16):
        if high <= 2**depth - 1:
            return depth
    return 32


def to_8_bits(values: np.ndarray) -> np.ndarray:
    """A grayscale scan of any depth as uint8, scaled by its bit depth (``bit_depth``), not by its own range.

    A 16-bit twin of an 8-bit scan (each value times 257) is that scan again, exactly; 12-bit data in a 16-bit
    file is scaled by 255 / 4095. Floats in [0, 1] are fractions of full scale.
    """
    if np.issubdtype(values.dtype, np.floating) and values.size and values.max() <= 1.0:
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    values = values.astype(np.float64)
    full_scale = 2.0 ** bit_depth(values) - 1
    return np.rint(np.clip(values, 0, full_scale) * (255.0 / full_scale)).astype(np.uint8)


# PIL's text for an image past its pixel limit: "Image size (N pixels) exceeds limit of M pixels, ..."
_TOO_LARGE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def imread_tool(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as grayscale uint8 [H, W].

    Transparent pixels are laid on white paper first (a signature saved with
    a transparent background would otherwise read as ink on black). 16-bit
    grayscale scans (TIFF or PNG, PIL mode ``I;16``; also ``I`` and ``F``)
    are scaled to 8 bits by their bit depth (``to_8_bits``: 16-bit by 255 / 65535, 12-bit data by 255 / 4095).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file cannot be decoded (truncated, not an image).
    """
    try:
        with Image.open(path) as image:
            if image.mode.startswith(("I", "F")):
                return to_8_bits(np.asarray(image))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found") from None
    except Image.DecompressionBombError as e:
        found = _TOO_LARGE.search(str(e))
        size = f" ({int(found[1]) / 1e6:.0f} megapixels, more than the {int(found[2]) / 1e6:.0f} PIL reads)" if found else ""
        raise ImageReadError(f"image {path} is too large for a scan{size}: scan it at a lower resolution "
                             "(300 dpi is plenty) or shrink it") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(
            f"cannot decode image {path}: {e}. The file may be truncated or not an image: "
            "re-download or re-extract it, or remove its pairs from the pair file."
        ) from e


def to_model_input(scan: np.ndarray, image_size: int, mode: str = "normalized") -> np.ndarray:
    """A scan as the model sees it: uint8 [image_size, image_size], ink bright on black.

    mode "normalized": normalize_image on the scan's own canvas (spec section 6),
    then invert and resize; "raw": invert and resize only, for scans that are
    already cropped, centred and cleaned. The resize is PIL's bilinear with
    antialiasing, as the authors' transform does.
    """
    if mode == "normalized":
        scan, _ = normalize_image(scan, scan.shape)
    inverted = Image.fromarray(255 - scan)
    # np.array copies: PIL's buffer is read-only, and torch wants a writable array.
    return np.array(inverted.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)


def load_signature(path: str | os.PathLike, image_size: int = 224, mode: str = "normalized") -> torch.Tensor:
    """Read one scan and prepare it for the model: float32 [1, image_size, image_size] in [0, 1].

    Raises FileNotFoundError, ImageReadError or BlankScanError, each naming the file.
    """
    return to_tensor(prepare_file(path, image_size, mode))


def prepare_file(path: str | os.PathLike, image_size: int, mode: str) -> np.ndarray:
    """``to_model_input`` of the file at ``path``: uint8 ``[image_size, image_size]``; errors name the file."""
    try:
        return to_model_input(imread_tool(path), image_size, mode)
    except BlankScanError as e:
        raise BlankScanError(f"{path}: {e}; remove its pairs from the pair file or replace the scan") from e


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [S, S] -> float32 [1, S, S] in [0, 1], as ToTensor divides.

    In numpy: torch would spread this small job over its thread pool, which
    costs milliseconds per image when the cores are busy.
    """
    return torch.from_numpy(image.astype(np.float32) / np.float32(255.0)).unsqueeze(0)
