"""What checking the feature store's chunks costs, against reading the store: seconds per GiB of tokens.

usage: python benchmarks/bench_feature_store.py [--gib 1] [--dir DIR] [--repeats 3]

Fills a store in ``--dir`` (default: a temporary folder on the disk of
``/tmp``) with ``--gib`` GiB of random float32 tokens of 224-pixel images
([n, 49, 384], 75 KB an image, chunks of ``CHUNK_BYTES``), then measures,
each in s/GiB (the fastest of ``--repeats`` runs: the one least slowed by other
processes):

  1. the check alone: hashing every chunk's ``.npy`` (SHA-256 in blocks, as
     ``FeatureStore.lookup`` does when it opens a chunk), files in the page
     cache: the CPU's part of the check;
  2. read, cold: ``gather(..., in_ram=True)`` (what ``compute_features``
     does with features that fit in RAM) over chunks already opened, after
     they are dropped from the page cache (``posix_fadvise(DONTNEED)``):
     reading the store from this disk without the check;
  3. the same with the check: a new store's ``lookup`` (hashing the chunks
     as it reads them from the disk) then ``gather``; and 3 - 2, what the
     check adds to reading the store (the kernel's read-ahead overlaps the
     disk's reading with the hashing);
  4. read, warm: ``gather`` with the chunks in the page cache.

Prints a markdown table, wall and CPU time (``time.process_time``: on loaded cores
the steadier figure), and removes the store. On Google Drive reads are slower than on a local
disk, so the check is a smaller share there than here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from module.features.store import CHUNK_BYTES, FeatureStore, file_sha256, gather

TOKENS, DIM = 49, 384  # 224 px: a 7 x 7 grid of 384-channel tokens


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of the chunks in ``folder`` (they are clean: written and fsynced)."""
    for path in folder.glob("chunk-*.npy"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of tokens in the store")
    parser.add_argument("--dir", default=None, help="folder for the store and its stand-in images")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each step; the fastest is shown")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    per_image = TOKENS * DIM * 4
    per_chunk = CHUNK_BYTES // per_image
    n_images = int(args.gib * 2**30 // per_image)
    images = work / "images"
    images.mkdir()
    paths = [str(images / f"{index}.png") for index in range(n_images)]
    for path in paths:  # the store keys an image on its path, size and mtime: empty files stand in for scans
        Path(path).touch()
    key = {"backbone": "bench", "image_size": 224, "dtype": "float32", "format": "bench"}
    store = FeatureStore(work / "store", key)
    rng = np.random.default_rng(0)
    with store.writing():
        for start in range(0, n_images, per_chunk):
            size = min(per_chunk, n_images - start)
            store.commit(paths[start:start + size], rng.standard_normal((size, TOKENS, DIM), dtype=np.float32),
                         np.ones((size, TOKENS), dtype=bool))
    gib = n_images * per_image / 2**30
    chunk_files = sorted(store.folder.glob("chunk-*.npy"))

    def fastest(step, cold: bool) -> tuple[float, float]:
        """(wall, CPU) seconds a GiB of the fastest of ``--repeats`` runs of ``step``."""
        runs = []
        for _ in range(args.repeats):
            if cold:
                drop_from_page_cache(store.folder)
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            runs.append(((time.perf_counter() - wall) / gib, (time.process_time() - cpu) / gib))
        return min(runs)

    def hash_all() -> None:
        for path in chunk_files:
            file_sha256(path)

    places, chunks = store.lookup(paths)  # the memory maps a read without the check goes through

    def read() -> None:
        gather(places, chunks, TOKENS, in_ram=True)

    def checked_read() -> None:
        found, opened = FeatureStore(work / "store", key).lookup(paths)
        gather(found, opened, TOKENS, in_ram=True)

    hash_all()  # into the page cache
    check, read_cold, checked_cold = fastest(hash_all, cold=False), fastest(read, cold=True), fastest(checked_read, cold=True)
    added = (checked_cold[0] - read_cold[0], checked_cold[1] - read_cold[1])
    rows = [("check alone (SHA-256 of each chunk, page cache)", check),
            ("read, cold (gather into RAM, no check)", read_cold),
            ("lookup with the check, then gather, cold", checked_cold),
            ("what the check adds to a cold read", added),
            ("read, warm (gather, page cache)", fastest(read, cold=False))]
    print(f"{gib:.2f} GiB of tokens in {len(chunk_files)} chunks\n")
    print("| step | wall s/GiB | CPU s/GiB |\n|---|---|---|")
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
