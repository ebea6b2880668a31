"""The fast path's feature cache: each distinct image through the frozen backbone once, pairs as rows into it.

With the backbone frozen and no augmentation, ``model.embed`` of an image
never changes, so ``compute_features`` embeds every distinct image of a pair
dataset once, and each epoch runs only ``model.compare`` on the cached
features. ``make_pair_loader`` builds the loader of either path: over a
``FeatureCache`` (batches of ``CachedPairBatch``) or over a pair dataset
(batches of images, two backbone passes a pair).
"""
from __future__ import annotations

import random
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from model_v3 import TokenFeatures

__all__ = [
    "CachedPairBatch", "FeatureCache", "amp_enabled", "compute_features", "make_pair_loader", "model_device",
    "pair_distances",
]


class CachedPairBatch(NamedTuple):
    """Pairs as cached backbone features.

    Attributes:
        ref: reference images' ``TokenFeatures`` (``tokens [B, N, 384]``, ``kept [B, N]``).
        query: query images' ``TokenFeatures``, same shapes.
        labels: ``[B, 1]`` float32, 1 genuine-genuine, 0 genuine-forged.
    """

    ref: TokenFeatures
    query: TokenFeatures
    labels: torch.Tensor


class _ImageFiles(Dataset):
    """The distinct images of a pair dataset, one ``[1, S, S]`` tensor an item, without augmentation."""

    def __init__(self, dataset: Any, paths: Sequence[str]) -> None:
        self.dataset = dataset
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.load_image(self.paths[index])


class FeatureCache(Dataset):
    """Backbone features of every distinct image of a pair dataset, and its pairs as rows into them.

    Built by ``compute_features``. As a dataset it has one item per pair
    (item ``i`` is ``i``); ``collate`` turns a list of pair indices into a
    ``CachedPairBatch``, so ``make_pair_loader(cache, ...)`` is the fast
    path's loader.

    Attributes:
        paths: the ``M`` distinct image paths, sorted.
        tokens: ``[M, N, 384]`` float32 or float16 stage-4 tokens (a tensor in
            RAM, or a read-only NumPy memory map on disk).
        kept: ``[M, N]`` bool ink masks.
        pair_rows: ``[P, 2]`` int64 rows of (reference, query) for each pair.
        labels: ``[P, 1]`` float32.
    """

    def __init__(self, paths: list[str], tokens: torch.Tensor | np.ndarray, kept: torch.Tensor,
                 pair_rows: torch.Tensor, labels: torch.Tensor) -> None:
        self.paths = paths
        self.tokens = tokens
        self.kept = kept
        self.pair_rows = pair_rows
        self.labels = labels

    def __len__(self) -> int:
        return len(self.pair_rows)

    def __getitem__(self, index: int) -> int:
        return index

    def features(self, rows: torch.Tensor) -> TokenFeatures:
        """The cached features of image ``rows`` (``[B]`` int64), on the CPU."""
        if isinstance(self.tokens, torch.Tensor):
            tokens = self.tokens[rows]
        else:
            tokens = torch.from_numpy(np.ascontiguousarray(self.tokens[rows.numpy()]))
        return TokenFeatures(tokens, self.kept[rows])

    def collate(self, pair_indices: Sequence[int]) -> CachedPairBatch:
        """The batch of pairs ``pair_indices`` (``collate_fn`` of the fast path's ``DataLoader``)."""
        index = torch.as_tensor(pair_indices, dtype=torch.int64)
        rows = self.pair_rows[index]
        return CachedPairBatch(self.features(rows[:, 0]), self.features(rows[:, 1]), self.labels[index])

    def __repr__(self) -> str:
        storage = "RAM" if isinstance(self.tokens, torch.Tensor) else f"disk ({getattr(self.tokens, 'filename', '?')})"
        return (f"FeatureCache({len(self.paths)} images, {len(self)} pairs, tokens {list(self.tokens.shape)} "
                f"{self.tokens.dtype} in {storage})")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter."""
    return next(model.parameters()).device


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    resolved = {"float32": torch.float32, "float16": torch.float16}.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float16):
        raise ValueError(f"feature dtype must be float32 or float16, got {dtype!r}")
    return resolved


def amp_enabled(amp: bool, device: torch.device) -> bool:
    """Whether ``amp`` takes effect on ``device``: mixed precision is for CUDA, on the CPU it only slows the backbone."""
    return amp and device.type == "cuda"


def compute_features(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype = "float32",
    feature_dir: str | Path = "",
    amp: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "embedding images",
) -> FeatureCache:
    """Embed each distinct image of ``dataset`` once (batched, eval mode, no augmentation) into a ``FeatureCache``.

    Args:
        model: ``ViT_for_OSV_DSNet``; its ``embed`` gives ``[B, N, 384]`` tokens and ``[B, N]`` masks.
        dataset: a pair dataset (``pairs``, ``image_paths()``, ``load_image(path) -> [1, S, S]``).
        batch_size: images per backbone pass.
        device: where the backbone runs; default the model's.
        dtype: ``"float32"`` (distances equal the per-pair path's to 1e-5) or
            ``"float16"`` (half the memory).
        feature_dir: empty: keep the tokens in RAM; a folder: keep them in a
            memory-mapped file in a temporary sub-folder there (deleted with
            the cache), for sets larger than RAM.
        amp: run the backbone under float16 autocast (CUDA only).
        num_workers: image-loading worker processes.

    Size: ``M * N * 384 * (4 or 2)`` bytes; ``N = (S / 32)^2`` (49 at 224
    pixels: 75 KB an image in float32).
    """
    paths = list(dataset.image_paths())
    if not paths or not len(dataset.pairs):
        raise ValueError(f"{type(dataset).__name__} has no pairs to embed")
    row_of = {path: row for row, path in enumerate(paths)}
    try:
        pair_rows = torch.tensor([[row_of[ref], row_of[query]] for ref, query, _ in dataset.pairs], dtype=torch.int64)
    except KeyError as error:
        raise ValueError(f"a pair names the image {error.args[0]}, which dataset.image_paths() does not list") from None
    labels = torch.tensor([[float(label)] for _, _, label in dataset.pairs], dtype=torch.float32)
    storage_dtype = _torch_dtype(dtype)
    device = torch.device(device) if device is not None else model_device(model)
    loader = DataLoader(
        _ImageFiles(dataset, paths), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the loader from drawing its seed from the global RNG
    )
    tokens: torch.Tensor | np.ndarray | None = None
    kept = None
    folder = None
    written = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp_enabled(amp, device)):
            for images in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
                features = model.embed(images.to(device, non_blocking=True))
                batch_tokens = features.tokens.to("cpu", storage_dtype)
                if tokens is None:
                    shape = (len(paths), *batch_tokens.shape[1:])
                    kept = torch.zeros(shape[:2], dtype=torch.bool)
                    if feature_dir:
                        Path(feature_dir).mkdir(parents=True, exist_ok=True)
                        folder = Path(tempfile.mkdtemp(prefix="features-", dir=feature_dir))
                        tokens = np.lib.format.open_memmap(folder / "tokens.npy", mode="w+",
                                                           dtype=np.dtype(str(storage_dtype).removeprefix("torch.")),
                                                           shape=shape)
                    else:
                        tokens = torch.empty(shape, dtype=storage_dtype)
                end = written + len(batch_tokens)
                tokens[written:end] = batch_tokens if isinstance(tokens, torch.Tensor) else batch_tokens.numpy()
                kept[written:end] = features.kept.cpu()
                written = end
    finally:
        model.train(was_training)
    if folder is not None:
        tokens.flush()
        del tokens
        tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    cache = FeatureCache(paths, tokens, kept, pair_rows, labels)
    if folder is not None:
        weakref.finalize(cache, shutil.rmtree, folder, ignore_errors=True)
    return cache


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; NumPy and random are derived from it so that
    # augmentation drawing from either differs between workers and epochs and repeats on resume.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_pair_loader(
    data: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of pairs: over a ``FeatureCache`` (fast path) or a pair dataset (per-pair path).

    ``generator`` orders the pairs and seeds the workers; its state is saved
    in checkpoints. Batches are ``CachedPairBatch`` (fast path) or
    ``(pairs [B, 2, S, S], labels [B, 1, 1])`` (per-pair path).
    """
    generator = generator if generator is not None else torch.Generator()
    if isinstance(data, FeatureCache):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=data.collate)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      worker_init_fn=_seed_worker, pin_memory=pin_memory)


def pair_distances(model: nn.Module, batch: Any, device: torch.device, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distance [B, 1], labels [B, 1])`` of a batch from either path.

    The per-pair path computes what ``model.forward`` does: two backbone
    passes, then ``compare``; ``compare`` runs outside autocast, and the EMD in float64.
    """
    if isinstance(batch, CachedPairBatch):
        distance = model.compare(batch.ref.to(device), batch.query.to(device))
        return distance, batch.labels.to(device)
    pairs, labels = batch
    pairs = pairs.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp_enabled(amp, device)):
        ref, query = model.embed(pairs[:, 0:1]), model.embed(pairs[:, 1:2])
    distance = model.compare(ref, query)
    return distance, labels.reshape(-1, 1).to(device, torch.float32)
