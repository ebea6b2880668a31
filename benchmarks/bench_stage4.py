"""Stage 4 fine-tuned from the feature store against the per-pair path (``finetune last:3``, no augmentation).

Run from the project root::

    python benchmarks/bench_stage4.py                        # 224 px, 1 training writer's pairs, a few minutes
    python benchmarks/bench_stage4.py --image-size 96 --pairs 64    # quick look

Both paths start from the same weights and train the same pairs in the same
order with the run's AdamW (``prepare_run``'s optimizer: ``head_str`` at
``lr``, the last 3 blocks and the final norm at ``lr_blocks``) for one epoch:

* per-pair: every pair through the whole backbone (two passes), as
  ``--no-fast-head-only`` trains;
* from the store: each distinct image through the frozen part once
  (stages 1-3 and stage 4's patch embedding, ``embed_until(images, 15)``:
  7x7x384 at 224 px), then stage 4's blocks, the final norm and ``head_str``
  on the stored features each step (``finetune last:3`` on the fast path).

It prints the seconds of an epoch each way (the store's one-off embedding
apart), the ratio, the largest weight difference after the epoch relative to
the largest weight, and the store's size per image at each cut point, with
what that means at CEDAR, BHSig260 and GPDS size.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from module.core.threads import passive_threads

passive_threads()  # before torch loads

import numpy as np
import torch
from torch.utils.data import Subset

from model_v3 import ViT_for_OSV_DSNet
from module.features.cache import FeatureCache
from module.features.store import feature_bytes, format_size
from module.run.config import FinetuneConfig
from module.run.rng import seed_everything
from module.run.state import prepare_run
from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset
from sig_dataloader_colab import SigDataset_CEDAR_Colab
from training_utils import compute_features, make_pair_loader, train_one_epoch

# Distinct scans of each dataset (genuine + forged), for the store sizes.
DATASET_IMAGES = {"CEDAR (55 writers)": 55 * 48, "BHSig260 (260 writers)": 100 * 54 + 160 * 54,
                  "GPDS (4,000 writers)": 4000 * 54}
CUTS = {"head-only (stage-4 tokens)": 18, "last:3 (stage 4's blocks)": 15, "last:12 (stages 3-4's blocks)": 6}


def one_epoch(data, config: FinetuneConfig, start: dict, batch_size: int) -> tuple[float, dict]:
    """Seconds of one training epoch over ``data`` from the weights ``start``, and the trained weights."""
    model = ViT_for_OSV_DSNet()
    model.load_state_dict(start)
    run = prepare_run(model, config, resume=False)
    loader = make_pair_loader(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(1))
    began = time.perf_counter()
    train_one_epoch(run.model, loader, run.optimizer, progress=False)
    seconds = time.perf_counter() - began
    return seconds, {name: p.detach().clone() for name, p in run.model.named_parameters() if p.requires_grad}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224, help="model input side, pixels (default 224)")
    parser.add_argument("--pairs", type=int, default=128, help="training pairs of the epoch (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (default 16)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "cedar"
        make_synthetic_dataset(root, "cedar", n_writers=2, seed=0, progress=False)
        generate_cedar_pairs(root, train_ratio=0.5)
        train_set = SigDataset_CEDAR_Colab(None, str(root), train=True, image_size=args.image_size, augment=False)
        sample = np.random.default_rng(0).choice(len(train_set), size=min(args.pairs, len(train_set)), replace=False)
        pairs = Subset(train_set, sorted(sample.tolist()))
        seed_everything(0)
        start = ViT_for_OSV_DSNet().state_dict()
        settings = dict(image_size=args.image_size, finetune="last:3", device="cpu", epochs=2, warmup_epochs=0)

        print("per-pair path ...", file=sys.stderr)
        per_pair_config = FinetuneConfig(ckpt_dir=f"{scratch}/per-pair", fast_head_only=False, **settings)
        per_pair_seconds, per_pair_weights = one_epoch(pairs, per_pair_config, start, args.batch_size)

        print("from the store ...", file=sys.stderr)
        model = ViT_for_OSV_DSNet()
        model.load_state_dict(start)
        began = time.perf_counter()
        stored = compute_features(model.eval(), train_set, block=15, batch_size=32, progress=False)
        embed_seconds = time.perf_counter() - began
        rows = torch.as_tensor(sorted(sample.tolist()))
        stored_pairs = FeatureCache(stored.paths, stored.tokens, stored.kept, stored.pair_rows[rows],
                                    stored.labels[rows], block=stored.block)
        store_config = FinetuneConfig(ckpt_dir=f"{scratch}/store", **settings)
        store_seconds, store_weights = one_epoch(stored_pairs, store_config, start, args.batch_size)
        n_images = len(stored.paths)

    largest = max(weights.abs().max().item() for weights in per_pair_weights.values())
    difference = max((per_pair_weights[name] - store_weights[name]).abs().max().item() for name in per_pair_weights)
    moved = max((per_pair_weights[name] - start[name]).abs().max().item() for name in per_pair_weights)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load average {load}), torch "
          f"{torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}; "
          f"{args.image_size} px; one epoch of {len(sample)} pairs of a synthetic CEDAR corpus, batch "
          f"{args.batch_size}; the store holds {n_images} images.\n")
    print("| finetune last:3, one epoch | per-pair path | from the store | per-pair / store |")
    print("|---|---:|---:|---:|")
    print(f"| seconds | {per_pair_seconds:.1f} | {store_seconds:.1f} | {per_pair_seconds / store_seconds:.1f}x |")
    print(f"| pairs per second | {len(sample) / per_pair_seconds:.1f} | {len(sample) / store_seconds:.1f} | |")
    print(f"| one-off: embedding {n_images} images through the frozen part | | {embed_seconds:.1f} s | |")
    print(f"\nweights after the epoch: largest difference {difference:.2e}, relative to the largest weight "
          f"{difference / largest:.2e} (the epoch moved a weight by at most {moved:.2e})")
    print(f"\n| store per image, float32 ({args.image_size} px) | per image | "
          + " | ".join(DATASET_IMAGES) + " |")
    print("|---|---:|" + "---:|" * len(DATASET_IMAGES))
    for cut, block in CUTS.items():
        per_image = feature_bytes(1, args.image_size, "float32", block)
        sizes = " | ".join(format_size(per_image * count) for count in DATASET_IMAGES.values())
        print(f"| {cut}, input of block {block} | {per_image / 1024:.0f} KiB | {sizes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
