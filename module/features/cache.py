"""The fast path's features: each distinct image through the frozen backbone once, pairs as rows into them.

With the backbone frozen and no augmentation, ``model.embed`` of an image
never changes, so ``compute_features`` embeds every distinct image of a pair
dataset once (or finds it in the persistent feature store,
``module/features/store.py``), and each epoch runs only ``model.compare`` on
the features (``module/features/loaders.py``). Under torchrun the processes
share the embedding: each embeds its share of the images.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model_v3 import TokenFeatures
from models.errors import InputError
from module.core.distributed import SINGLE_PROCESS, ProcessGroup, gather_in_order
from module.core.precision import autocast, autocast_dtype, model_device
from module.core.progress import progress_bar, write_line
from module.data.epoch_order import share
from module.features.store import (
    CHUNK_BYTES,
    LAST_BLOCK,
    RAM_SHARE,
    ChunkedTokens,
    FeatureStore,
    available_memory,
    feature_bytes,
    format_size,
    gather,
    resolve_feature_dtype,
)

__all__ = ["CachedPairBatch", "FeatureCache", "compute_features", "pair_labels"]

# The feature stores this process has named in its log. A run opens its store once a split: the first opening
# says where the store is and what it held, a later one speaks only when it embeds or memory-maps.
_STORES_NAMED: set[Path] = set()

class CachedPairBatch(NamedTuple):
    """Pairs as cached backbone features.

    Attributes:
        ref: reference images' ``TokenFeatures`` (``tokens [B, N, 384]``, ``kept [B, N]``).
        query: query images' ``TokenFeatures``, same shapes.
        labels: ``[B, 1]`` float32, 1 genuine-genuine, 0 genuine-forged.
        block: the backbone block whose input the tokens are (``LAST_BLOCK``: the stage-4 tokens; an earlier
            one: ``model.embed_from(features, block)`` finishes them, with the blocks that train).
    """

    ref: TokenFeatures
    query: TokenFeatures
    labels: torch.Tensor
    block: int = LAST_BLOCK


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
        tokens: ``[M, N, 384]`` float32 or float16 stage-4 tokens: a tensor in
            RAM, or ``ChunkedTokens`` reading the feature store's memory-mapped files.
        kept: ``[M, N]`` bool ink masks.
        pair_rows: ``[P, 2]`` int32 rows of (reference, query) for each pair.
        labels: ``[P, 1]`` float32.
        embedded: how many images went through the backbone to build it (the
            others came from the feature store).
        location: the feature store's folder, or None when nothing is stored.
        block: the backbone block whose input ``tokens`` are (``LAST_BLOCK``: the stage-4 tokens ``[M, N, 384]``;
            block ``k``: ``[M, n_k, C_k]``, see ``models.dsnet.dsnet.token_shape``).
    """

    def __init__(self, paths: list[str], tokens: torch.Tensor | ChunkedTokens, kept: torch.Tensor,
                 pair_rows: torch.Tensor, labels: torch.Tensor, embedded: int = 0, location: Path | None = None,
                 block: int = LAST_BLOCK) -> None:
        self.block = block
        self.paths = paths
        self.tokens = tokens
        self.kept = kept
        self.pair_rows = pair_rows
        self.labels = labels
        self.embedded = embedded
        self.location = location

    def __len__(self) -> int:
        return len(self.pair_rows)

    def __getitem__(self, index: int) -> int:
        return index

    def features(self, rows: torch.Tensor) -> TokenFeatures:
        """The cached features of image ``rows`` (``[B]`` integers), on the CPU."""
        if isinstance(self.tokens, torch.Tensor):
            tokens = self.tokens[rows]
        else:
            tokens = torch.from_numpy(self.tokens[rows.numpy()])
        return TokenFeatures(tokens, self.kept[rows])

    def collate(self, pair_indices: Sequence[int]) -> CachedPairBatch:
        """The batch of pairs ``pair_indices`` (``collate_fn`` of the fast path's ``DataLoader``)."""
        index = torch.as_tensor(pair_indices, dtype=torch.int64)
        rows = self.pair_rows[index]
        return CachedPairBatch(self.features(rows[:, 0]), self.features(rows[:, 1]), self.labels[index], self.block)

    def __repr__(self) -> str:
        storage = "RAM" if isinstance(self.tokens, torch.Tensor) else f"memory-mapped files in {self.location}"
        return (f"FeatureCache({len(self.paths)} images, {len(self)} pairs, tokens {list(self.tokens.shape)} "
                f"{self.tokens.dtype} in {storage})")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    resolved = {"float32": torch.float32, "float16": torch.float16}.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float16):
        raise InputError(f"feature dtype must be float32, float16 or auto, got {dtype!r}")
    return resolved


def pair_labels(data: Any) -> np.ndarray:
    """``[P]`` labels of a ``FeatureCache`` or a pair dataset, 1 genuine-genuine, 0 genuine-forged."""
    if isinstance(data, FeatureCache):
        return data.labels.reshape(-1).numpy()
    if hasattr(data, "pair_labels"):
        return np.asarray(data.pair_labels)
    return np.fromiter((label for *_, label in data.pairs), dtype=np.float32, count=len(data.pairs))


def _pair_arrays(dataset: Any, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_rows [P, 2]`` int32 into ``paths`` and ``labels [P, 1]`` float32, from the dataset's arrays when it has them."""
    if hasattr(dataset, "pair_rows") and getattr(dataset, "image_files", None) == paths:
        rows = np.asarray(dataset.pair_rows, dtype=np.int32)
    else:
        row_of = {path: row for row, path in enumerate(paths)}
        try:
            rows = np.fromiter((row_of[path] for reference, query, _ in dataset.pairs for path in (reference, query)),
                               dtype=np.int32, count=2 * len(dataset.pairs)).reshape(-1, 2)
        except KeyError as error:
            raise ValueError(f"a pair names the image {error.args[0]}, which dataset.image_paths() does not list") from None
    labels = pair_labels(dataset).astype(np.float32).reshape(-1, 1)
    return torch.from_numpy(rows), torch.from_numpy(labels)


def _embedded_batches(model: nn.Module, dataset: Any, paths: list[str], batch_size: int, device: torch.device,
                      storage_dtype: torch.dtype, amp: bool | str, num_workers: int, progress: bool, desc: str,
                      block: int) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """``(paths, tokens [b, n, C] in storage_dtype, kept [b, N])`` at the input of ``block`` on the CPU, batch by
    batch, in eval mode."""
    loader = DataLoader(
        _ImageFiles(dataset, paths), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the loader from drawing its seed from the global RNG
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            for start, images in zip(range(0, len(paths), batch_size),
                                     progress_bar(loader, desc=desc, unit="batch", leave=False, disable=not progress)):
                features = model.embed_until(images.to(device, non_blocking=True), block)
                yield paths[start:start + batch_size], features.tokens.to("cpu", storage_dtype), features.kept.cpu()
    finally:
        model.train(was_training)


def compute_features(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype = "float32",
    feature_dir: str | Path = "",
    amp: bool | str = False,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "embedding images",
    chunk_images: int | None = None,
    group: ProcessGroup = SINGLE_PROCESS,
    block: int = LAST_BLOCK,
) -> FeatureCache:
    """The backbone features of each distinct image of ``dataset`` (batched, eval mode, no augmentation), as a ``FeatureCache``.

    Args:
        model: ``ViT_for_OSV_DSNet``; its ``embed`` gives ``[B, N, 384]`` tokens and ``[B, N]`` masks.
        dataset: a pair dataset (``pairs`` or ``pair_rows``/``pair_labels``, ``image_paths()``,
            ``load_image(path) -> [1, S, S]``, ``image_size``).
        batch_size: images per backbone pass.
        device: where the backbone runs; default the model's.
        dtype: ``"float32"`` (distances equal the per-pair path's to 1e-5), ``"float16"`` (half the
            memory) or ``"auto"`` (float16 when float32 would pass ``RAM_SHARE`` of the RAM available).
        feature_dir: empty: embed every image, keep the features in RAM only. A folder: the persistent
            feature store there (module/features/store.py): images it holds are not embedded again, the
            others are added in atomically committed chunks; the features are then read into RAM, or
            memory-mapped when they would take more than ``RAM_SHARE`` of the RAM available.
        amp: run the backbone under autocast on CUDA: ``True`` (float16) or an ``AMP_DTYPES`` name.
        num_workers: image-loading worker processes.
        progress: progress bars, and log lines: what the store held (the first time this process opens it,
            and whenever images are embedded), and features memory-mapped rather than read into RAM.
        chunk_images: images a store chunk (default: about ``CHUNK_BYTES`` of tokens).
        group: the processes of a torchrun job: each embeds its share of the images (into the store,
            or gathered by every process in RAM); every process returns the whole cache.
        block: keep the features at the input of this backbone block (``model.embed_until``): the default,
            ``LAST_BLOCK``, is ``embed``'s stage-4 tokens; an earlier block is where a partly trained
            backbone's frozen part ends (``finetune last:N``: block ``18 - N``).

    Size: ``M * N * 384 * (4 or 2)`` bytes; ``N = (S / 32)^2`` (49 at 224
    pixels: 75 KB an image in float32); at an earlier block, ``feature_bytes``.
    """
    paths = list(dataset.image_paths())
    if not paths or not len(dataset):
        raise ValueError(f"{type(dataset).__name__} has no pairs to embed")
    pair_rows, labels = _pair_arrays(dataset, paths)
    log = write_line if progress and group.is_main else None
    image_size = int(dataset.image_size)
    dtype_name = resolve_feature_dtype(dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."),
                                       len(paths), image_size, log, block)
    storage_dtype = _torch_dtype(dtype_name)
    device = torch.device(device) if device is not None else model_device(model)
    embedding = dict(batch_size=batch_size, device=device, storage_dtype=storage_dtype, amp=amp,
                     num_workers=num_workers, progress=progress and group.is_main, desc=desc, block=block)

    if not feature_dir:
        mine = share(np.arange(len(paths)), group)
        batches = list(_embedded_batches(model, dataset, [paths[i] for i in mine], **embedding))
        tokens = gather_in_order(torch.cat([batch_tokens for _, batch_tokens, _ in batches]), mine, len(paths), group)
        kept = gather_in_order(torch.cat([batch_kept for _, _, batch_kept in batches]), mine, len(paths), group)
        return FeatureCache(paths, tokens, kept, pair_rows, labels, embedded=len(paths), block=block)

    autocast_name = str(autocast_dtype(amp, device) or "").removeprefix("torch.") or False
    store = FeatureStore(feature_dir, FeatureStore.key_for(model, image_size, dtype_name,
                                                           getattr(dataset, "mode", "normalized"), autocast_name,
                                                           block))
    # Rank 0 holds the store open for writing (its lock) until every process's chunks are committed.
    with store.writing() if group.is_main else nullcontext():
        group.barrier()
        places, chunks = store.lookup(paths)
        missing = [path for path, place in zip(paths, places) if place is None]
        if log is not None and (missing or store.folder not in _STORES_NAMED):
            found = (f"{len(paths) - len(missing)} of {len(paths)} images found"
                     + (f", embedding {len(missing)}" if missing else ", nothing to embed"))
            log(f"feature store: {found}" if store.folder in _STORES_NAMED else f"feature store {store.folder}: {found}")
            _STORES_NAMED.add(store.folder)
        if missing:
            per_chunk = chunk_images or max(1, CHUNK_BYTES // feature_bytes(1, image_size, dtype_name, block))
            pending: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
            mine = [missing[i] for i in share(np.arange(len(missing)), group)]
            for batch in _embedded_batches(model, dataset, mine, **embedding):
                pending.append(batch)
                while sum(len(paths_) for paths_, _, _ in pending) >= per_chunk:
                    pending = _commit(store, pending, per_chunk)
            if pending:
                _commit(store, pending, None)
            group.barrier()  # every process's chunks are committed
            places, chunks = store.lookup(paths)
            changed = [path for path, place in zip(paths, places) if place is None]
            if changed:
                raise OSError(f"{len(changed)} image(s) changed while they were embedded, e.g. {changed[0]}: run again")
    needed, available = feature_bytes(len(paths), image_size, dtype_name, block), available_memory()
    in_ram = needed <= RAM_SHARE * available
    tokens, kept = gather(places, chunks, (image_size // 32) ** 2, in_ram)
    if log is not None and not in_ram:  # in RAM is the rule, and needs no line
        log(f"features of {len(paths):,} images ({format_size(needed)} {dtype_name}) memory-mapped from "
            f"{store.folder}: more than {RAM_SHARE:.0%} of the {format_size(available)} of RAM available")
    return FeatureCache(paths, tokens, kept, pair_rows, labels, embedded=len(missing), location=store.folder,
                        block=block)


def _commit(store: FeatureStore, pending: list[tuple[list[str], torch.Tensor, torch.Tensor]], size: int | None
            ) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Commit the first ``size`` (all, for None) pending images as one chunk; returns what is left pending."""
    paths = [path for batch_paths, _, _ in pending for path in batch_paths]
    tokens = torch.cat([batch_tokens for _, batch_tokens, _ in pending])
    kept = torch.cat([batch_kept for _, _, batch_kept in pending])
    size = len(paths) if size is None else size
    store.commit(paths[:size], tokens[:size].numpy(), kept[:size].numpy())
    return [(paths[size:], tokens[size:], kept[size:])] if size < len(paths) else []
