"""The feature store: each image's backbone features on disk, kept across re-runs, resumes and disconnects.

With the backbone frozen, ``model.embed`` of an image depends only on the
backbone's weights, the image file and how it is prepared. The store keeps
those features in a folder, keyed on all of them, so that a resumed run, an
evaluation or a re-run embeds nothing it has embedded before::

    ROOT/<key>/key.json               what the key is made of
    ROOT/<key>/chunk-<id>.npy         tokens [n, N, 384] (float32 or float16) of n images
    ROOT/<key>/chunk-<id>.json        those n images (path, size, mtime) and their ink masks: the commit

``<key>`` hashes the backbone's weights fingerprint, the image size, the
dtype, the preprocessing version, the preprocessing mode, autocast and this
store's format; an image is found only under its own path, size and
modification time, so an image that changed is embedded again and nothing
else is. Images are embedded in chunks of about ``CHUNK_BYTES``; each chunk
is written atomically (``module.io.atomic_write``), tokens first and its
JSON last, so a disconnect loses at most the chunk being embedded. Chunks
are never rewritten, which suits Google Drive, and two runs may share a
store.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.weights import weights_fingerprint
from module.core.io import TEMPORARY_SUFFIX, atomic_write, atomic_write_text
from module.data.images import CACHE_VERSION

__all__ = [
    "CHUNK_BYTES", "RAM_SHARE", "ChunkedTokens", "FeatureStore", "available_memory", "feature_bytes", "format_size",
    "gather", "resolve_feature_dtype",
]

# Bump when ``embed``'s output changes for the same weights and image (e.g. the rule for kept tokens).
STORE_FORMAT = 1
CHUNK_BYTES = 64 * 2**20
# Features go to RAM while they take at most this share of the memory available, else they stay memory-mapped;
# the rest is left for the model, the data loader and the notebook.
RAM_SHARE = 0.4
ORPHAN_AGE_S = 3600  # a chunk's tokens without its JSON, older than this, come from an interrupted write
TOKEN_DIM = 384


def feature_bytes(n_images: int, image_size: int, dtype: str) -> int:
    """Bytes of the stage-4 tokens of ``n_images`` at ``image_size`` pixels: ``n * (S/32)^2 * 384 * (4 or 2)``."""
    return n_images * (image_size // 32) ** 2 * TOKEN_DIM * np.dtype(dtype).itemsize


def available_memory() -> int:
    """Bytes of RAM available to this process now (Linux: MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def resolve_feature_dtype(dtype: str, n_images: int, image_size: int, log: Callable[[str], None] | None = None) -> str:
    """``dtype``, with ``"auto"`` resolved: float32, or float16 when float32 features would pass ``RAM_SHARE`` of the
    RAM available."""
    if dtype != "auto":
        return dtype
    needed, available = feature_bytes(n_images, image_size, "float32"), available_memory()
    if needed <= RAM_SHARE * available:
        return "float32"
    if log is not None:
        log(f"feature dtype float16: float32 features of {n_images:,} images at {image_size} px would take "
            f"{format_size(needed)}, more than {RAM_SHARE:.0%} of the {format_size(available)} of RAM available "
            "(set the feature dtype to float32 to insist)")
    return "float16"


class ChunkedTokens:
    """Tokens ``[M, N, 384]`` read from the store's memory-mapped chunks: ``tokens[rows]`` gathers rows into an array."""

    def __init__(self, chunks: list[np.ndarray], chunk_of: np.ndarray, row_in_chunk: np.ndarray) -> None:
        self.chunks, self.chunk_of, self.row_in_chunk = chunks, chunk_of, row_in_chunk
        self.shape = (len(chunk_of), *chunks[0].shape[1:])
        self.dtype = chunks[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        chunk_of = self.chunk_of[rows]
        for chunk in np.unique(chunk_of):
            where = chunk_of == chunk
            out[where] = self.chunks[chunk][self.row_in_chunk[rows[where]]]
        return out


class FeatureStore:
    """One key's folder of committed chunks (see the module docstring).

    Args:
        root: the store's folder (``FinetuneConfig.feature_dir``, by default ``features/`` in the run folder).
        key: what produced the features; ``FeatureStore.key_for`` makes it.
    """

    def __init__(self, root: str | os.PathLike, key: dict[str, Any]) -> None:
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / digest
        self.dtype = np.dtype(key["dtype"])

    @staticmethod
    def key_for(model: nn.Module, image_size: int, dtype: str, mode: str, autocast: bool | str) -> dict[str, Any]:
        """The key of features from ``model``'s backbone (``model.model``) at ``image_size`` in ``dtype``."""
        backbone = getattr(model, "model", model)
        return {"backbone": weights_fingerprint(backbone.state_dict()), "image_size": int(image_size), "dtype": dtype,
                "preprocessing": CACHE_VERSION, "mode": mode, "autocast": autocast, "format": STORE_FORMAT}

    # ------------------------------------------------------------------ reading

    def _chunk_names(self) -> list[str]:
        return sorted(path.name[:-len(".json")] for path in self.folder.glob("chunk-*.json"))

    def lookup(self, paths: Sequence[str]) -> tuple[list[tuple[str, int, str] | None], dict[str, np.ndarray]]:
        """Where each image's features are: ``(chunk, row, kept mask as hex)``, or None where it must be embedded.

        An entry counts only while the file has the size and modification time
        it had when it was embedded; of several, the newest chunk's wins.
        Returns the places and the memory-mapped chunks they name.
        """
        wanted = {path: index for index, path in enumerate(paths)}
        stamps: dict[int, tuple[int, int]] = {}
        for path, index in wanted.items():
            stat = os.stat(path)
            stamps[index] = (stat.st_size, stat.st_mtime_ns)
        places: list[tuple[str, int, str] | None] = [None] * len(paths)
        chunks: dict[str, np.ndarray] = {}
        for name in self._chunk_names():
            try:
                record = json.loads((self.folder / f"{name}.json").read_text())
                tokens = np.load(self.folder / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError):
                continue  # a damaged chunk: its images are embedded again
            if tokens.shape[0] != len(record["images"]) or tokens.dtype != self.dtype:
                continue
            for row, (path, size, mtime_ns, kept) in enumerate(record["images"]):
                index = wanted.get(path)
                if index is not None and stamps[index] == (size, mtime_ns):
                    places[index] = (name, row, kept)
                    chunks[name] = tokens
        return places, chunks

    # ------------------------------------------------------------------ writing

    def prepare(self) -> None:
        """Create the folder, write ``key.json`` once, and remove what interrupted writes left behind."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "key.json").is_file():
            atomic_write_text(self.folder / "key.json", json.dumps(self.key, indent=1))
        old = time.time() - ORPHAN_AGE_S
        for path in self.folder.iterdir():
            orphan = path.suffix == ".npy" and not path.with_suffix(".json").exists()
            if (orphan or path.name.endswith(TEMPORARY_SUFFIX)) and path.stat().st_mtime < old:
                path.unlink(missing_ok=True)

    def commit(self, paths: Sequence[str], tokens: np.ndarray, kept: np.ndarray) -> str:
        """Write one chunk: ``tokens [n, N, 384]`` and ``kept [n, N]`` of the images ``paths``; returns its name."""
        name = f"chunk-{time.time_ns():020d}-{os.getpid()}"
        images = []
        for path, mask in zip(paths, kept):
            stat = os.stat(path)
            images.append([path, stat.st_size, stat.st_mtime_ns, np.packbits(mask).tobytes().hex()])
        atomic_write(self.folder / f"{name}.npy", lambda file: np.save(file, np.ascontiguousarray(tokens, self.dtype)))
        record = {"tokens": list(tokens.shape), "dtype": self.dtype.name, "images": images}
        atomic_write_text(self.folder / f"{name}.json", json.dumps(record))  # the commit point
        return name

    def __repr__(self) -> str:
        return f"FeatureStore({self.folder}, {len(self._chunk_names())} chunks)"


def unpack_kept(hex_mask: str, n_tokens: int) -> np.ndarray:
    """A chunk's stored ink mask back to ``[N]`` bool."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(hex_mask), dtype=np.uint8))[:n_tokens].astype(bool)


def gather(places: Sequence[tuple[str, int, str]], chunks: dict[str, np.ndarray], n_tokens: int, in_ram: bool
           ) -> tuple[torch.Tensor | ChunkedTokens, torch.Tensor]:
    """The tokens ``[M, N, 384]`` (a tensor in RAM, or ``ChunkedTokens`` over the memory maps) and ``kept [M, N]``."""
    names = sorted({name for name, _, _ in places})
    number = {name: index for index, name in enumerate(names)}
    chunk_of = np.array([number[name] for name, _, _ in places], dtype=np.int32)
    row_in_chunk = np.array([row for _, row, _ in places], dtype=np.int64)
    kept = torch.from_numpy(np.stack([unpack_kept(mask, n_tokens) for _, _, mask in places]))
    tokens = ChunkedTokens([chunks[name] for name in names], chunk_of, row_in_chunk)
    if not in_ram:
        return tokens, kept
    loaded = torch.empty(tokens.shape, dtype=getattr(torch, tokens.dtype.name))
    for chunk in range(len(names)):  # chunk by chunk: each file read once, in order
        where = np.flatnonzero(chunk_of == chunk)
        loaded[torch.from_numpy(where)] = torch.from_numpy(np.ascontiguousarray(tokens.chunks[chunk][row_in_chunk[where]]))
    return loaded, kept
