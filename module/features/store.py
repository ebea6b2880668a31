"""The feature store: each image's backbone features on disk, kept across re-runs, resumes and disconnects.

With the backbone frozen, ``model.embed`` of an image depends only on the
backbone's weights, the image file and how it is prepared. The store keeps
those features in a folder, keyed on all of them, so that a resumed run, an
evaluation or a re-run embeds nothing it has embedded before::

    ROOT/<key>/key.json               what the key is made of
    ROOT/<key>/store.lock             locked (flock) by each process writing the store
    ROOT/<key>/chunk-<id>.npy         tokens [n, N, 384] (float32 or float16) of n images
    ROOT/<key>/chunk-<id>.json        those n images (path, size, mtime), their ink masks, the checksums: the commit
    ROOT/<key>/damaged/               chunks that failed their check, set aside

``<key>`` hashes the backbone's weights fingerprint, the image size, the
dtype, the preprocessing version, the preprocessing mode, autocast and this
store's format; an image is found only under its own path, size and
modification time, so an image that changed is embedded again and nothing
else is. Images are embedded in chunks of about ``CHUNK_BYTES``; each chunk
is written atomically (``module.core.io.atomic_write``), tokens first and its
JSON record last, so a disconnect loses at most the chunk being embedded.
Chunks are never rewritten, which suits Google Drive, and two runs may share
a store.

Checksums: a chunk's record holds the SHA-256 of its ``.npy`` file
(``npy_sha256``) and its own (``sha256``, of the canonical JSON of the rest
of the record), written in the same commit. Each chunk is checked when a
``FeatureStore`` first opens it, the ``.npy`` hashed in blocks so that
memory-mapped features stay on disk. A chunk that fails (a flipped bit, a
partial sync, a truncated file, a record without its tokens) is moved to
``damaged/`` with one warning naming it, and its images are reported
missing, so ``compute_features`` embeds them again. Format-1 chunks had no
checksums: ``STORE_FORMAT`` 2 keeps the new chunks under another key, so an
old chunk is never read as checked, and an older checkout sharing the
folder keeps its own chunks (the old key's folder can be deleted).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.dsnet.dsnet import DEPTHS, token_shape
from models.weights import weights_fingerprint
from module.core.io import TEMPORARY_SUFFIX, atomic_write, atomic_write_text
from module.core.wording import option
from module.data.images import CACHE_VERSION

try:
    import fcntl
except ImportError:  # not on Linux or macOS: no file locks, only the age rule removes leftovers
    fcntl = None

__all__ = [
    "CHUNK_BYTES", "DAMAGED_FOLDER", "LAST_BLOCK", "LOCK_FILE", "RAM_SHARE", "ChunkedTokens", "FeatureStore", "available_memory",
    "feature_bytes", "file_sha256", "format_size", "gather", "resolve_feature_dtype",
]

# Bump when ``embed``'s output or the chunk files change for the same weights and image (2: chunks carry checksums).
STORE_FORMAT = 2
CHUNK_BYTES = 64 * 2**20
# Features go to RAM while they take at most this share of the memory available, else they stay memory-mapped;
# the rest is left for the model, the data loader and the notebook.
RAM_SHARE = 0.4
# A chunk's tokens without its JSON, or a temporary file, older than this, come from an interrupted write even when
# another process writes the store too (a live write renames its tokens and writes its JSON within seconds).
ORPHAN_AGE_S = 3600
LAST_BLOCK = sum(DEPTHS)  # features at its input are the stage-4 tokens, what ``embed`` gives
LOCK_FILE = "store.lock"
DAMAGED_FOLDER = "damaged"
_HASH_BLOCK = 2**20  # bytes read at a time while hashing a chunk's tokens
# errno values of a write that failed for want of room: a full disk, a full quota, a file-size limit.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_FILE_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def feature_bytes(n_images: int, image_size: int, dtype: str, block: int = LAST_BLOCK) -> int:
    """Bytes of the features of ``n_images`` at ``image_size`` pixels at the input of ``block``: the stage-4 tokens
    (``block`` 15-18) take ``n * (S/32)^2 * 384 * (4 or 2)``; see ``models.dsnet.dsnet.token_shape``."""
    n_tokens, channels = token_shape(image_size, block)
    return n_images * n_tokens * channels * np.dtype(dtype).itemsize


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


def resolve_feature_dtype(dtype: str, n_images: int, image_size: int, log: Callable[[str], None] | None = None,
                          block: int = LAST_BLOCK) -> str:
    """``dtype``, with ``"auto"`` resolved: float32, or float16 when float32 features (at the input of ``block``)
    would pass ``RAM_SHARE`` of the RAM available."""
    if dtype != "auto":
        return dtype
    needed, available = feature_bytes(n_images, image_size, "float32", block), available_memory()
    if needed <= RAM_SHARE * available:
        return "float32"
    if log is not None:
        log(f"feature dtype float16: float32 features of {n_images:,} images at {image_size} px would take "
            f"{format_size(needed)}, more than {RAM_SHARE:.0%} of the {format_size(available)} of RAM available "
            "(set the feature dtype to float32 to insist)")
    return "float16"


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of the file ``path``, read ``_HASH_BLOCK`` bytes at a time (never the whole file in RAM)."""
    digest = hashlib.sha256()
    block = bytearray(_HASH_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as file:
        while size := file.readinto(block):
            digest.update(view[:size])
    return digest.hexdigest()


def _record_sha256(record: dict[str, Any]) -> str:
    """SHA-256 (hex) of a chunk record without its ``sha256`` field, as canonical JSON (sorted keys, no spaces)."""
    rest = {name: value for name, value in record.items() if name != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _DamagedChunk(Exception):
    """A chunk's files do not match its checksums, or cannot be read; the message says which."""


@contextmanager
def _writing_to(path: Path) -> Iterator[None]:
    """Re-raise a write of ``path`` that failed for want of room (a full disk, quota or file-size limit) with the
    path and what to do; other errors pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in _NO_SPACE:
            raise
        reason = "" if error.errno == errno.ENOSPC else f" ({os.strerror(error.errno)})"  # a quota, a size limit
        raise OSError(error.errno, f"cannot write {path}: no space left on the device{reason}: free some space on "
                                   f"that disk, or point {option('feature_dir')} elsewhere") from error


def _lock_exclusively(descriptor: int) -> bool | None:
    """Take ``descriptor``'s exclusive flock if no other process holds one: whether it was taken, or None where the
    file system (or the OS) has no file locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno not in _NO_FILE_LOCKS:
            raise
        return None
    return True


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

    Writers: a process embeds into the store inside ``writing()``, which
    holds a shared ``flock`` on ``store.lock`` throughout. A writer that gets
    that lock exclusively when it opens the store is the only one, and
    deletes what interrupted writes left (tokens without their record,
    temporary files) of any age. With two writers (a shared
    ``--feature-dir``), neither gets it while the other writes: each then
    deletes only leftovers older than ``ORPHAN_AGE_S``, which no live write
    is, and the rest go at the next open by a lone writer. Where the file
    system has no file locks, the age rule alone applies. File locks reach
    the processes of one machine only: a writer on another machine (two
    Colab runtimes on one Drive folder) is not seen, and a chunk it was
    committing may lose its tokens, which the next check then finds damaged
    and embeds again.

    Args:
        root: the store's folder (``FinetuneConfig.feature_dir``, by default ``features/`` in the run folder).
        key: what produced the features; ``FeatureStore.key_for`` makes it.
    """

    def __init__(self, root: str | os.PathLike, key: dict[str, Any]) -> None:
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / digest
        self.dtype = np.dtype(key["dtype"])
        # Chunks are never rewritten, so what this store checked once stays checked: a second lookup (after
        # embedding) hashes only the chunks committed since.
        self._records: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, np.ndarray] = {}

    @staticmethod
    def key_for(model: nn.Module, image_size: int, dtype: str, mode: str, autocast: bool | str,
                block: int = LAST_BLOCK) -> dict[str, Any]:
        """The key of features from ``model``'s backbone (``model.model``) at ``image_size`` in ``dtype``, at the
        input of ``block`` (``LAST_BLOCK``: the stage-4 tokens, keyed on the whole backbone as they always were;
        an earlier block: keyed on the weights before it alone, which stay frozen while the rest trains)."""
        backbone = getattr(model, "model", model)
        key = {"backbone": weights_fingerprint(backbone.state_dict()), "image_size": int(image_size), "dtype": dtype,
               "preprocessing": CACHE_VERSION, "mode": mode, "autocast": autocast, "format": STORE_FORMAT}
        if block != LAST_BLOCK:
            key.update(backbone=weights_fingerprint(backbone.state_dict_until(block)), block=block)
        return key

    # ------------------------------------------------------------------ reading

    def _chunk_names(self) -> list[str]:
        return sorted(path.name[:-len(".json")] for path in self.folder.glob("chunk-*.json"))

    def lookup(self, paths: Sequence[str]) -> tuple[list[tuple[str, int, str] | None], dict[str, np.ndarray]]:
        """Where each image's features are: ``(chunk, row, kept mask as hex)``, or None where it must be embedded.

        An entry counts only while the file has the size and modification time
        it had when it was embedded; of several, the newest chunk's wins. A
        chunk is checked against its checksums before it is used (its tokens
        only when it holds an image asked for); one that fails is set aside
        (``damaged/``, one warning) and its images count as missing.
        Returns the places and the memory-mapped chunks they name.
        """
        wanted = {path: index for index, path in enumerate(paths)}
        stamps: dict[int, tuple[int, int]] = {}
        for path, index in wanted.items():
            stat = os.stat(path)
            stamps[index] = (stat.st_size, stat.st_mtime_ns)
        places: list[tuple[str, int, str] | None] = [None] * len(paths)
        chunks: dict[str, np.ndarray] = {}
        for name in reversed(self._chunk_names()):  # newest first: tokens all found in newer chunks are not read
            try:
                found = []
                for row, (path, size, mtime_ns, kept) in enumerate(self._record(name)["images"]):
                    index = wanted.get(path)
                    if index is not None and places[index] is None and stamps[index] == (size, mtime_ns):
                        found.append((index, row, kept))
                if found:
                    chunks[name] = self._opened_tokens(name)
            except _DamagedChunk as damage:
                self._set_aside(name, str(damage))
                continue
            for index, row, kept in found:
                places[index] = (name, row, kept)
        return places, chunks

    def _record(self, name: str) -> dict[str, Any]:
        """The checked record of chunk ``name``. Raises ``_DamagedChunk``."""
        if name not in self._records:
            try:
                record = json.loads((self.folder / f"{name}.json").read_bytes())
            except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not JSON
                raise _DamagedChunk(f"its record cannot be read: {error}") from error
            if not isinstance(record, dict) or record.get("sha256") != _record_sha256(record):
                raise _DamagedChunk("its record does not match its checksum")
            self._records[name] = record
        return self._records[name]

    def _opened_tokens(self, name: str) -> np.ndarray:
        """The tokens ``[n, N, 384]`` of chunk ``name``, memory-mapped once their file matched its checksum.

        Raises ``_DamagedChunk``.
        """
        if name not in self._tokens:
            path = self.folder / f"{name}.npy"
            try:
                matches = file_sha256(path) == self._records[name]["npy_sha256"]
                tokens = np.load(path, mmap_mode="r") if matches else None
            except (OSError, ValueError) as error:
                raise _DamagedChunk(f"its tokens cannot be read: {error}") from error
            if tokens is None:
                raise _DamagedChunk("its tokens do not match their checksum")
            self._tokens[name] = tokens
        return self._tokens[name]

    def _set_aside(self, name: str, problem: str) -> None:
        """Move chunk ``name`` into ``damaged/`` (its record first: without it the chunk is out of the store) and warn."""
        self._records.pop(name, None)
        damaged = self.folder / DAMAGED_FOLDER
        try:
            damaged.mkdir(exist_ok=True)
            for suffix in (".json", ".npy"):
                try:
                    os.replace(self.folder / f"{name}{suffix}", damaged / f"{name}{suffix}")
                except FileNotFoundError:  # never written, or another process set it aside first
                    pass
            where = f"moved to {damaged} (delete it there when you have looked)"
        except OSError as error:
            where = f"left in place, since it cannot be moved ({error})"
        warnings.warn(f"feature store: chunk {self.folder / name} is damaged ({problem}; a disk or sync error?): "
                      f"{where}; its images are embedded again", stacklevel=3)

    # ------------------------------------------------------------------ writing

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store open for writing: create the folder, lock ``store.lock`` shared for the block, remove what
        interrupted writes left (of any age when this process is the only writer; see the class docstring) and write
        ``key.json`` once.

        Raises:
            OSError: the folder cannot be written; no room on the device says so and what to do.
        """
        with _writing_to(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            descriptor: int | None = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            alone = _lock_exclusively(descriptor)
            if alone is None:  # no file locks on this file system: the age rule alone
                os.close(descriptor)
                descriptor = None
            self._remove_leftovers(any_age=bool(alone))
            if descriptor is not None:
                # One of the writers from now on: a lone writer's exclusive lock gives way to a shared one. Nothing
                # of this process is in the folder yet, so another writer's cleanup in between takes nothing of it.
                fcntl.flock(descriptor, fcntl.LOCK_SH)
            key_path = self.folder / "key.json"
            if not key_path.is_file():
                with _writing_to(key_path):
                    atomic_write_text(key_path, json.dumps(self.key, indent=1))
            yield
        finally:
            if descriptor is not None:
                os.close(descriptor)  # closing releases the flock

    def _remove_leftovers(self, any_age: bool) -> None:
        """Delete chunk tokens without their record and temporary files: all of them with ``any_age``, else those
        older than ``ORPHAN_AGE_S``."""
        old = time.time() - ORPHAN_AGE_S
        for path in self.folder.iterdir():
            orphan = path.name.startswith("chunk-") and path.suffix == ".npy" and not path.with_suffix(".json").exists()
            if not (orphan or path.name.endswith(TEMPORARY_SUFFIX)):
                continue
            try:
                if any_age or path.stat().st_mtime < old:
                    path.unlink()
            except FileNotFoundError:  # renamed into place or removed by another writer meanwhile
                pass

    def commit(self, paths: Sequence[str], tokens: np.ndarray, kept: np.ndarray) -> str:
        """Write one chunk: ``tokens [n, N, 384]`` and ``kept [n, N]`` of the images ``paths``; returns its name.

        Call it inside ``writing()``. Raises ``OSError`` naming the file; no room on the device says so and what to do.
        """
        name = f"chunk-{time.time_ns():020d}-{os.getpid()}"
        images = []
        for path, mask in zip(paths, kept):
            stat = os.stat(path)
            images.append([path, stat.st_size, stat.st_mtime_ns, np.packbits(mask).tobytes().hex()])
        # Serialised in memory first: np.save into the file reports a short write (a full disk) without an errno,
        # while file.write of the bytes raises ENOSPC; and the bytes are hashed on the way.
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(tokens, self.dtype))
        data = buffer.getbuffer()
        record = {"tokens": list(tokens.shape), "dtype": self.dtype.name, "images": images,
                  "npy_sha256": hashlib.sha256(data).hexdigest()}
        record["sha256"] = _record_sha256(record)
        tokens_path, record_path = self.folder / f"{name}.npy", self.folder / f"{name}.json"
        with _writing_to(tokens_path):
            atomic_write(tokens_path, lambda file: file.write(data))
        with _writing_to(record_path):
            atomic_write_text(record_path, json.dumps(record))  # the commit point
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
