"""Lazy signature-pair datasets: a pair file and a dataset root in, `(pair [2, S, S], label [1, 1])` out.

The constructor reads the pair file and keeps paths only, and checks
everything that can be checked without decoding an image, so that a bad
file stops a run before training starts: a missing pair file (the error
names the function that makes it), lines that do not parse (with their
numbers), labels other than 0/1, and images that do not exist (the first few
and the count). Each item is read, normalized (module/preprocess.py),
inverted, resized and, for training, augmented in `__getitem__`; a scan that
cannot be decoded or holds no ink raises an error naming the file there.

Optionally, preprocessed images (uint8 at the model's input size) are cached
on disk under `cache_dir`, keyed on the file's path, modification time and
size, the image size and the mode, so later epochs skip the blur, the Otsu
threshold and the centring, and a changed file is recomputed.
"""
from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from module.preprocess import BlankScanError, normalize_image
from module.io import atomic_write
from module.pair_files import PAIR_FILES, PairFileError, existing_files, read_pair_index, resolve_pair_file

__all__ = [
    "ImageReadError",
    "PairAugmentation",
    "PairList",
    "SigDataset_BHSig_Colab",
    "SigDataset_CEDAR_Colab",
    "SigDataset_GDPS_Colab",
    "SignaturePairDataset",
    "imread_tool",
    "load_signature",
    "to_model_input",
]

MODES = ("normalized", "raw")
# Bump when the preprocessing changes, so cached images of the old kind are not reused.
CACHE_VERSION = "1"
MISSING_SHOWN = 5


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
    return _to_tensor(_prepare_file(path, image_size, mode))


def _prepare_file(path: str | os.PathLike, image_size: int, mode: str) -> np.ndarray:
    try:
        return to_model_input(imread_tool(path), image_size, mode)
    except BlankScanError as e:
        raise BlankScanError(f"{path}: {e}; remove its pairs from the pair file or replace the scan") from e


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [S, S] -> float32 [1, S, S] in [0, 1], as ToTensor divides.

    In numpy: torch would spread this small job over its thread pool, which
    costs milliseconds per image when the cores are busy.
    """
    return torch.from_numpy(image.astype(np.float32) / np.float32(255.0)).unsqueeze(0)


class PairAugmentation:
    """The authors' training augmentation, with the same random parameters for both images of a pair.

    ColorJitter(0.4, 0.4, 0.4, 0.2), RandomErasing(), RandomHorizontalFlip(),
    RandomVerticalFlip(), RandomResizedCrop(image_size). The geometric steps
    work on the stacked pair [2, S, S] directly, so one draw covers both
    images. ColorJitter accepts 1 or 3 channels only, so its parameters are
    drawn once and applied to each image on its own: brightness and contrast
    (contrast blends towards each image's own mean, as jittering it alone
    would); saturation and hue leave a grayscale image unchanged.
    """

    def __init__(self, image_size: int):
        self.color_jitter = transforms.ColorJitter(0.4, 0.4, 0.4, 0.2)
        self.geometric = transforms.Compose([
            transforms.RandomErasing(),
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.RandomResizedCrop(image_size, antialias=True),
        ])

    def _jitter(self, pair: torch.Tensor) -> torch.Tensor:
        cj = self.color_jitter
        order, brightness, contrast, saturation, hue = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
        steps = {
            0: (TF.adjust_brightness, brightness),
            1: (TF.adjust_contrast, contrast),
            2: (TF.adjust_saturation, saturation),
            3: (TF.adjust_hue, hue),
        }
        images = []
        for image in pair.split(1):
            for index in order.tolist():
                adjust, factor = steps[index]
                if factor is not None:
                    image = adjust(image, factor)
            images.append(image)
        return torch.cat(images)

    def __call__(self, pair: torch.Tensor) -> torch.Tensor:
        """pair: float32 [2, S, S] in [0, 1] -> augmented float32 [2, S, S]."""
        return self.geometric(self._jitter(pair))


class PairList(Sequence):
    """A dataset's pairs as ``(reference path, query path, label)`` tuples, made on demand from its arrays.

    Reads like the list of tuples it replaces (indexing, slicing, iteration,
    ``==`` with a list); 4 M pairs as tuples would take about 300 MB.
    """

    def __init__(self, image_files: list[str], rows: np.ndarray, labels: np.ndarray) -> None:
        self._images, self._rows, self._labels = image_files, rows, labels

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        reference, query = self._rows[index]
        return self._images[reference], self._images[query], int(self._labels[index])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"PairList({len(self)} pairs)"


class SignaturePairDataset(Dataset):
    """Pairs of signature scans listed in a pair file, loaded lazily.

    Args:
        opt: the authors' option namespace; accepted so their calls work
            unchanged, and not read (may be None).
        path: the dataset root; the pair file's paths are relative to it.
        train: read gray_train.txt (True) or gray_test.txt (False), unless
            `pair_file` is given; also the default of `augment`.
        image_size: side S of the model input, pixels.
        mode: "normalized" (the spec's preprocessing) or "raw" (scans already
            cropped and centred: invert and resize only).
        pair_file: a pair file to read instead; a relative path is relative to `path`.
        augment: apply the training augmentation to each pair; default `train`.
        cache_dir: folder for a disk cache of preprocessed images; None: no cache.

    Item: (pair float32 [2, S, S] in [0, 1], ink bright on black; reference
    first), label float32 [1, 1] (1 genuine-genuine, 0 genuine-forgery).

    Attributes: `image_files` (the distinct absolute image paths, sorted),
    `pair_rows` (int32 [P, 2] rows of each pair's reference and query into
    `image_files`), `pair_labels` (uint8 [P]), and `pairs`, the same pairs as
    (absolute reference path, query path, label) tuples made on demand. The
    training fast path also uses `image_paths()`, `load_image(path)`,
    `augment`, `image_size` and `mode`.
    """

    # Named in the error raised when the pair file is missing.
    pair_file_maker = "prepare_datasets.generate_cedar_pairs"
    cli_command = "cedar"

    def __init__(
        self,
        opt,
        path: str | os.PathLike,
        train: bool = True,
        image_size: int = 224,
        mode: str = "normalized",
        pair_file: str | os.PathLike | None = None,
        augment: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 8:
            raise ValueError(f"image_size must be an int of at least 8 pixels, got {image_size!r}")
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} not found (path={str(path)!r})")
        pair_path = resolve_pair_file(root, pair_file if pair_file is not None else PAIR_FILES["train" if train else "test"])
        if not pair_path.is_file():
            raise FileNotFoundError(
                f"pair file {pair_path} not found: make it with {self.pair_file_maker}({str(root)!r}) "
                f"or `python prepare_datasets.py {self.cli_command} {root}`"
            )
        index = read_pair_index(pair_path)
        index.raise_for_problems()
        if not len(index.rows):
            raise PairFileError(f"{pair_path} holds no pairs")

        relative = index.images
        missing = sorted(set(relative) - existing_files(root, relative))
        if missing:
            shown = "\n".join(f"  {root / p}" for p in missing[:MISSING_SHOWN])
            raise FileNotFoundError(
                f"{len(missing)} of the {len(relative)} images named in {pair_path} do not exist, e.g.:\n{shown}\n"
                f"Check the dataset root (path={str(root)!r}) or regenerate the pair file; "
                f"`python prepare_datasets.py validate {root} {pair_path}` lists them all."
            )
        # Pairs as rows into the distinct images (34,080 CEDAR pairs share 1,920 paths); two spellings of one
        # file ("a/../b.png", "b.png") become one image.
        absolute = [os.path.abspath(root / p) for p in relative]
        self.image_files: list[str] = sorted(set(absolute))
        row_of = {path: row for row, path in enumerate(self.image_files)}
        renumber = np.array([row_of[path] for path in absolute], dtype=np.int32)
        self.pair_rows: np.ndarray = renumber[index.rows]
        self.pair_labels: np.ndarray = index.labels
        self.root = str(root)
        self.pair_file = str(pair_path)
        self.image_size = int(image_size)
        self.mode = mode
        self.augment = train if augment is None else bool(augment)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.augmentation = PairAugmentation(self.image_size)

    @property
    def pairs(self) -> PairList:
        """``(absolute reference path, query path, label)`` of each pair, made on demand."""
        return PairList(self.image_files, self.pair_rows, self.pair_labels)

    def __len__(self) -> int:
        return len(self.pair_rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        reference, query = self.pair_rows[index]
        pair = torch.cat([self.load_image(self.image_files[reference]), self.load_image(self.image_files[query])])
        if self.augment:
            pair = self.augmentation(pair)
        return pair, torch.tensor([[float(self.pair_labels[index])]], dtype=torch.float32)

    def image_paths(self) -> list[str]:
        """The distinct image paths of all pairs, sorted."""
        return list(self.image_files)

    def load_image(self, path: str) -> torch.Tensor:
        """One image as the model sees it, without augmentation: float32 [1, S, S] in [0, 1]."""
        if self.cache_dir is None:
            return _to_tensor(_prepare_file(path, self.image_size, self.mode))
        return _to_tensor(self._cached(path))

    def _cache_file(self, path: str) -> Path:
        stat = os.stat(path)
        key = f"{CACHE_VERSION}|{os.path.abspath(path)}|{stat.st_mtime_ns}|{stat.st_size}|{self.image_size}|{self.mode}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.npy"

    def _cached(self, path: str) -> np.ndarray:
        try:
            cache_file = self._cache_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} not found (it existed when the dataset was built)") from None
        try:
            image = np.load(cache_file)
            if image.shape == (self.image_size, self.image_size) and image.dtype == np.uint8:
                return image
        except (OSError, ValueError, EOFError):
            pass  # not cached yet, or a damaged entry: compute it again
        image = _prepare_file(path, self.image_size, self.mode)
        # Atomic under a unique temporary name: DataLoader workers may race on one entry.
        atomic_write(cache_file, lambda file: np.save(file, image))
        return image

    def __repr__(self) -> str:
        genuine = int(self.pair_labels.sum(dtype=np.int64))
        return (
            f"{type(self).__name__}({len(self)} pairs: {genuine} genuine, {len(self) - genuine} forgery; "
            f"pair_file={self.pair_file!r}, image_size={self.image_size}, mode={self.mode!r}, augment={self.augment})"
        )


class SigDataset_CEDAR_Colab(SignaturePairDataset):
    """CEDAR pairs (full_org/, full_forg/); pair files from prepare_datasets.generate_cedar_pairs."""


class SigDataset_GDPS_Colab(SignaturePairDataset):
    """GPDS-style pairs (train/, test/{subject}/); pair files from prepare_datasets.generate_gdps_pairs."""

    pair_file_maker = "prepare_datasets.generate_gdps_pairs"
    cli_command = "gpds"


class SigDataset_BHSig_Colab(SignaturePairDataset):
    """BHSig260 pairs (one language folder, one folder a writer); pair files from prepare_datasets.generate_bhsig_pairs."""

    pair_file_maker = "prepare_datasets.generate_bhsig_pairs"
    cli_command = "bhsig"
