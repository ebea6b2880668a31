"""Reading a scan as the model sees it: any image file (8/16-bit, palette, RGBA) in, ``[1, S, S]`` float32 out.

``imread_tool`` reads a file as grayscale uint8, ``to_model_input``
normalizes (``module/data/preprocess.py``), inverts and resizes it, and
``load_signature`` does both for one file. Errors name the file.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from module.data.preprocess import BlankScanError, normalize_image

__all__ = ["CACHE_VERSION", "MODES", "ImageReadError", "imread_tool", "load_signature", "prepare_file", "to_model_input",
           "to_tensor"]

MODES = ("normalized", "raw")
# Bump when the preprocessing changes, so cached images and stored features of the old kind are not reused.
CACHE_VERSION = "1"


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


def _to_8_bits(values: np.ndarray) -> np.ndarray:
    """A 16-bit (or 32-bit, or float) grayscale scan as uint8, its lowest value 0 and its highest 255.

    By the values actually used, not by the type's range: a 12-bit scanner's
    file holds 0..4095, and a cast or PIL's ``convert("L")`` (which clips at
    255) would make it black, or white paper with no ink.
    """
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:  # a constant image: the blank-scan check names it later
        return np.full(values.shape, 255, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def imread_tool(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as grayscale uint8 [H, W].

    Transparent pixels are laid on white paper first (a signature saved with
    a transparent background would otherwise read as ink on black). 16-bit
    grayscale scans (TIFF or PNG, PIL mode ``I;16``; also ``I`` and ``F``)
    are scaled to 8 bits by the range of their values (``_to_8_bits``).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file cannot be decoded (truncated, not an image).
    """
    try:
        with Image.open(path) as image:
            if image.mode.startswith(("I", "F")):
                return _to_8_bits(np.asarray(image))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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
