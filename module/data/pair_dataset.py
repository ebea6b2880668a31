"""Lazy signature-pair datasets: a pair file and a dataset root in, ``(pair [2, S, S], label [1, 1])`` out.

The constructor reads the pair file and keeps paths only, and checks
everything that can be checked without decoding an image, so that a bad
file stops a run before training starts: a missing pair file (the error
names the command that makes it), lines that do not parse (with their
numbers), labels other than 0/1, and images that do not exist (the first few
and the count). Each item is read, normalized (``module/data/preprocess.py``),
inverted, resized and, for training, augmented in ``__getitem__``; a scan
that cannot be decoded or holds no ink raises an error naming the file there.

Optionally, preprocessed images (uint8 at the model's input size) are cached
on disk under ``cache_dir``, keyed on the file's path, modification time and
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
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from models.errors import InputError
from module.core.io import atomic_write
from module.core.wording import option, prepare_command
from module.data.datasets import DATASETS, dataset_layout
from module.data.datasets.record import DatasetLayout
from module.data.images import CACHE_VERSION, MODES, prepare_file, to_tensor
from module.data.pair_files import PAIR_FILES, PairFileError, existing_files, read_pair_index, resolve_pair_file

__all__ = ["PairAugmentation", "PairDatasets", "PairList", "SigDataset_BHSig_Colab", "SigDataset_CEDAR_Colab",
           "SigDataset_GDPS_Colab", "SignaturePairDataset"]

MISSING_SHOWN = 5


def _check_layout(layout: DatasetLayout, images: Sequence[str], pair_file: Path) -> None:
    """Refuse pair files whose scans are named as another layout's (a CEDAR folder read as BHSig): the figures
    that depend on the layout (writers, kinds of forgery) would be wrong. Names of no layout are the user's own."""
    sample = images[:: max(1, len(images) // 200)]
    if any(layout.signature_of(path) is not None for path in sample):
        return
    others = sorted({other.name for other in DATASETS.values() if other is not layout
                     for path in sample if other.signature_of(path) is not None})
    if others:
        raise InputError(f"{pair_file} names {others[0]} scans ({DATASETS[others[0]].naming}), not {layout.name} ones. "
                         f"Fix: {option('dataset', others[0])}, or point the dataset root at a {layout.title} folder")


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
        cache_dir: folder for a disk cache of preprocessed images; None or "": no cache.
        dataset: the layout (``cedar``, ``gpds``, ``bhsig``), for the command that makes a missing pair file;
            default the class's.

    Item: (pair float32 [2, S, S] in [0, 1], ink bright on black; reference
    first), label float32 [1, 1] (1 genuine-genuine, 0 genuine-forgery).

    Attributes: `image_files` (the distinct absolute image paths, sorted),
    `pair_rows` (int32 [P, 2] rows of each pair's reference and query into
    `image_files`), `pair_labels` (uint8 [P]), and `pairs`, the same pairs as
    (absolute reference path, query path, label) tuples made on demand. The
    training fast path also uses `image_paths()`, `load_image(path)`,
    `augment`, `image_size` and `mode`.
    """

    # The layout whose pair files the dataset reads (``module/data/datasets``): named in the fix of a missing one.
    dataset = "cedar"

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
        dataset: str | None = None,
    ):
        if mode not in MODES:
            raise InputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 8:
            raise InputError(f"image_size must be an int of at least 8 pixels, got {image_size!r}")
        layout = dataset_layout(dataset or self.dataset)
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} not found (path={str(path)!r})")
        pair_path = resolve_pair_file(root, pair_file if pair_file is not None else PAIR_FILES["train" if train else "test"])
        if not pair_path.is_file():
            raise FileNotFoundError(
                f"pair file {pair_path} not found. Fix: {prepare_command(layout.name, root, {})}")
        index = read_pair_index(pair_path)
        index.raise_for_problems()
        if not len(index.rows):
            raise PairFileError(f"{pair_path} holds no pairs")
        _check_layout(layout, index.images, pair_path)

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
        self.dataset = layout.name
        self.augment = train if augment is None else bool(augment)
        self.cache_dir = Path(cache_dir) if cache_dir else None  # "" is no cache, not the working directory
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
            return to_tensor(prepare_file(path, self.image_size, self.mode))
        return to_tensor(self._cached(path))

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
        image = prepare_file(path, self.image_size, self.mode)
        # Atomic under a unique temporary name: DataLoader workers may race on one entry.
        atomic_write(cache_file, lambda file: np.save(file, image))
        return image

    def __repr__(self) -> str:
        genuine = int(self.pair_labels.sum(dtype=np.int64))
        return (
            f"{type(self).__name__}({len(self)} pairs: {genuine} genuine, {len(self) - genuine} forgery; "
            f"pair_file={self.pair_file!r}, image_size={self.image_size}, mode={self.mode!r}, augment={self.augment})"
        )


class SigDataset_CEDAR_Colab(SignaturePairDataset):  # noqa: N801 - the seed's public names
    """CEDAR pairs (full_org/, full_forg/); the seed's name for ``SignaturePairDataset(dataset="cedar")``."""


class SigDataset_GDPS_Colab(SignaturePairDataset):  # noqa: N801
    """GPDS-style pairs (train/, test/{subject}/); ``SignaturePairDataset(dataset="gpds")``."""

    dataset = "gpds"


class SigDataset_BHSig_Colab(SignaturePairDataset):  # noqa: N801
    """BHSig260 pairs (one language folder, one folder a writer); ``SignaturePairDataset(dataset="bhsig")``."""

    dataset = "bhsig"


class PairDatasets(torch.utils.data.ConcatDataset):
    """Several pair datasets read as one (the parts of a synthetic pre-training corpus): their pairs in order.

    ``pair_labels`` ``[P]``, ``pairs``, ``image_paths()`` and ``load_image``
    cover every part, as a single ``SignaturePairDataset``'s do; an item is
    its part's item.
    """

    def __init__(self, parts: Sequence[SignaturePairDataset]) -> None:
        super().__init__(parts)
        self.pair_labels = np.concatenate([part.pair_labels for part in parts])
        self.image_size = parts[0].image_size
        self.augment = parts[0].augment

    def image_paths(self) -> list[str]:
        return sorted({path for part in self.datasets for path in part.image_paths()})

    @property
    def pairs(self) -> PairList:
        """Every part's ``(reference path, query path, label)``, in order."""
        images = self.image_paths()
        row_of = {path: row for row, path in enumerate(images)}
        rows = np.concatenate([np.array([row_of[path] for path in part.image_files], dtype=np.int32)[part.pair_rows]
                               for part in self.datasets])
        return PairList(images, rows, self.pair_labels)

    def load_image(self, path: str) -> torch.Tensor:
        """One image, without augmentation: float32 [1, S, S] (the parts share their image settings)."""
        return self.datasets[0].load_image(path)
