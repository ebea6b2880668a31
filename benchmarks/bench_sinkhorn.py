"""The structural distance: packed, active-set, float32-in-training (models.emd) against the padded float64 one.

usage: python benchmarks/bench_sinkhorn.py [--data-root DIR] [--tokens random|embed] [--batch-size 64]
                                           [--repeats 15] [--device cpu] [--threads-table]

On the same cached-like inputs at 224 px (tokens ``[B, 49, 384]``, the
model's ``head_str = Linear(384, 96)``, ``cos`` cost), in one run and
interleaved, it compares today's structural distance (the padded float64
implementation, ``tests/test_emd_fast.padded_sinkhorn_emd``, on the cost of
the whole grid) with the model's (``ViT_for_OSV_DSNet.structural_distance``):

* the training step, forward and backward through ``head_str`` at eps 5e-2,
  in ms a pair (wall and this process's CPU time), and the speed-up; and
  its two parts apart: ``head_str`` and the cost (on the whole grid / on the
  packed kept tokens), and the Sinkhorn alone (w.r.t. the whole grid's cost);
* an evaluation pass (eps 5e-8, no gradient), in ms a pair;
* agreement: evaluation distances (float64, max relative difference, must be
  <= 1e-12), training distances and ``head_str`` gradients (float32 against
  float64, <= 1e-5), and the float64 training path;
* host syncs a batch: the calls that wait for the device (``.item()``,
  ``.tolist()``, ``bool(tensor)``, ``.nonzero()``), counted on any device.

Masks: ``--data-root DIR`` takes a CEDAR-layout folder
(``full_org/original_{w}_{n}.png``, ``full_forg/forgeries_{w}_{n}.png``) and
builds real kept-token masks from ``2 * batch`` of its scans as
``ViT_for_OSV_DSNet.embed`` does; without it the masks are random with the
density of real scans (43 % kept). Tokens: with ``--data-root``, the scans
through a freshly initialised backbone (``--tokens embed``, the default: the
features the store would hold; at the training epsilon their pairs need 8 to
100 iterations), or random (``--tokens random``, the default without it: pairs
stop after ~6 iterations, so the Sinkhorn's share is far smaller).

``--threads-table`` then times the new training step in separate processes,
interleaved: ``OMP_NUM_THREADS=1``, ``2`` (default wait policy) and ``2`` with
``OMP_WAIT_POLICY=PASSIVE``, reporting CPU seconds (``time.process_time``) and
wall seconds (``time.perf_counter``) a step; with ``--busy`` beside a process
that keeps one core busy (a shared machine). ``finetune.py`` and the notebook
set ``OMP_WAIT_POLICY=PASSIVE`` (``module/core/threads.py``) from this table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_v3 import (
    KEPT_TOKEN_MARGIN,
    SINKHORN_CHECK_EVERY_TRAIN,
    SINKHORN_EPS_EVAL,
    SINKHORN_EPS_TRAIN,
    TokenFeatures,
    ViT_for_OSV_DSNet,
)
from models.emd import pack_valid, pairwise_cost, sinkhorn_emd, unit_rows
from tests.test_emd_fast import padded_sinkhorn_emd

GRID = (7, 7)  # 224 px / 32
REAL_SCAN_DENSITY = 0.43
THREAD_SETTINGS = {"1 thread": {"OMP_NUM_THREADS": "1"},
                   "2 threads": {"OMP_NUM_THREADS": "2"},
                   "2 threads, PASSIVE": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}}


def scan_paths(data_root: Path, count: int, seed: int) -> list[Path]:
    """``count`` scans of a CEDAR-layout folder, genuine and forged mixed, in a seeded order."""
    paths = sorted((data_root / "full_org").glob("original_*_*.png")) + sorted(
        (data_root / "full_forg").glob("forgeries_*_*.png"))
    if len(paths) < count:
        raise SystemExit(f"{data_root} holds {len(paths)} CEDAR scans, {count} are needed")
    return random.Random(seed).sample(paths, count)


def scan_images(paths: list[Path]) -> torch.Tensor:
    """``[count, 1, 224, 224]`` model inputs of the scans."""
    from sig_dataloader_colab import load_signature

    return torch.stack([load_signature(path, 224) for path in paths])


def kept_masks(images: torch.Tensor) -> torch.Tensor:
    """``[count, 49]`` kept tokens, by ``ViT_for_OSV_DSNet.embed``'s rule."""
    ink = torch.nn.functional.interpolate(images, size=GRID, mode="area").flatten(1)
    return ink >= ink.amin(dim=1, keepdim=True) + KEPT_TOKEN_MARGIN


def inputs(args: argparse.Namespace, model: ViT_for_OSV_DSNet) -> tuple[TokenFeatures, TokenFeatures, str]:
    """Reference and query features of ``batch`` pairs on the CPU, and where their masks come from."""
    count = 2 * args.batch_size
    generator = torch.Generator().manual_seed(args.seed)
    if args.data_root is None:
        if args.tokens == "embed":
            raise SystemExit("--tokens embed needs --data-root")
        kept = torch.rand(count, GRID[0] * GRID[1], generator=generator) < REAL_SCAN_DENSITY
        source = f"random masks, {REAL_SCAN_DENSITY:.0%} kept"
        tokens = torch.randn(count, GRID[0] * GRID[1], 384, generator=generator)
    else:
        images = scan_images(scan_paths(args.data_root, count, args.seed))
        kept = kept_masks(images)
        source = f"real masks of {count} scans of {args.data_root}, {kept.float().mean():.0%} kept"
        if args.tokens == "embed":
            with torch.no_grad():
                features = model.eval().embed(images)
            tokens = features.tokens
            assert torch.equal(features.kept, kept)
        else:
            tokens = torch.randn(count, GRID[0] * GRID[1], 384, generator=generator)
    half = args.batch_size
    return TokenFeatures(tokens[:half], kept[:half]), TokenFeatures(tokens[half:], kept[half:]), source


def padded_distance(model: ViT_for_OSV_DSNet, ref: TokenFeatures, query: TokenFeatures, eps: float) -> torch.Tensor:
    """Today's structural distance: head_str and the cost on the whole grid, the padded float64 Sinkhorn."""
    return padded_sinkhorn_emd(model._token_cost(ref, query), query.kept, ref.kept, eps=eps)


def new_distance(model: ViT_for_OSV_DSNet, ref: TokenFeatures, query: TokenFeatures) -> torch.Tensor:
    """The model's structural distance in its current mode."""
    return model.structural_distance(ref, query)


def training_step(distance: Callable[[], torch.Tensor], model: ViT_for_OSV_DSNet) -> torch.Tensor:
    """Forward and backward through head_str (the only trained part here); the head's weight gradient."""
    model.head_str.zero_grad(set_to_none=True)
    distance().sum().backward()
    return model.head_str.weight.grad


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def counted_syncs() -> Iterator[Counter]:
    """Counts the calls of the Tensor methods that wait for the device (on any device, the CPU included)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "nonzero")}

    def counting(name: str, original: Callable) -> Callable:
        def method(self: torch.Tensor, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def max_relative(value: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest ``|value - expected| / |expected|`` over the nonzero expected entries."""
    value, expected = value.double(), expected.double()
    nonzero = expected != 0
    assert torch.equal(value[~nonzero], expected[~nonzero])
    return float(((value - expected).abs()[nonzero] / expected.abs()[nonzero]).max()) if nonzero.any() else 0.0


def gradient_relative(value: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |value - expected| / max |expected|``: a gradient compared at the scale of the whole."""
    return float((value.double() - expected.double()).abs().max() / expected.double().abs().max())


def agreement(model: ViT_for_OSV_DSNet, ref: TokenFeatures, query: TokenFeatures) -> list[tuple[str, str]]:
    rows = []
    model.eval()
    with torch.no_grad():
        cost = model._token_cost(ref, query).double()
        expected = padded_sinkhorn_emd(cost, query.kept, ref.kept, eps=SINKHORN_EPS_EVAL)
        value = sinkhorn_emd(cost, query.kept, ref.kept, eps=SINKHORN_EPS_EVAL)  # the model's arithmetic, in float64
        same32 = torch.equal(new_distance(model, ref, query), padded_distance(model, ref, query, SINKHORN_EPS_EVAL))
    rows.append(("evaluation distances, float64, max rel. diff (<= 1e-12)", f"{max_relative(value, expected):.1e}"))
    rows.append(("evaluation distances as the model returns them (float32), identical", str(same32)))
    model.train()
    expected_gradient = training_step(lambda: padded_distance(model, ref, query, SINKHORN_EPS_TRAIN), model).clone()
    expected = padded_distance(model, ref, query, SINKHORN_EPS_TRAIN).detach()
    value_gradient = training_step(lambda: new_distance(model, ref, query), model).clone()
    value = new_distance(model, ref, query).detach()
    rows.append(("training distances, float32, max rel. diff (<= 1e-5)", f"{max_relative(value, expected):.1e}"))
    rows.append(("training head_str gradient, float32, max rel. diff (<= 1e-5)",
                 f"{gradient_relative(value_gradient, expected_gradient):.1e}"))
    cost = model._token_cost(ref, query).detach()
    float64 = sinkhorn_emd(cost, query.kept, ref.kept, eps=SINKHORN_EPS_TRAIN)
    padded = padded_sinkhorn_emd(cost, query.kept, ref.kept, eps=SINKHORN_EPS_TRAIN)
    rows.append(("training distances, float64 path, same cost, max rel. diff (<= 1e-12)",
                 f"{max_relative(float64, padded):.1e}"))
    return rows


def sync_counts(model: ViT_for_OSV_DSNet, ref: TokenFeatures, query: TokenFeatures) -> list[tuple[str, str]]:
    rows = []
    for mode, eps in (("training", SINKHORN_EPS_TRAIN), ("evaluation", SINKHORN_EPS_EVAL)):
        model.train(mode == "training")
        with torch.no_grad():
            with counted_syncs() as padded:
                padded_distance(model, ref, query, eps)
            with counted_syncs() as new:
                new_distance(model, ref, query)
        rows.append((f"host syncs a batch, {mode}: padded / new", f"{sum(padded.values())} / {sum(new.values())}"))
    return rows


def timings(model: ViT_for_OSV_DSNet, ref: TokenFeatures, query: TokenFeatures, repeats: int,
            device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds a batch of each measurement, ``repeats`` rounds interleaved after a warm-up round.

    CPU seconds (this process's) are the steadier figure on a shared machine: other processes' load stretches the
    wall time; with one thread the CPU time is the work itself.
    """
    # The mode is set before each timing: model.train() walks the whole backbone (~20 ms), once an epoch in training.
    def train(distance: Callable[[], torch.Tensor]) -> tuple[bool, Callable[[], object]]:
        return True, lambda: training_step(distance, model)

    def evaluate(distance: Callable[[], torch.Tensor]) -> tuple[bool, Callable[[], object]]:
        def run() -> None:
            with torch.no_grad():
                distance()
        return False, run

    cost = model.train()._token_cost(ref, query).detach()

    def sinkhorn_alone(emd: Callable[..., torch.Tensor], **options) -> tuple[bool, Callable[[], object]]:
        def run() -> None:
            leaf = cost.clone().requires_grad_()
            emd(leaf, query.kept, ref.kept, eps=SINKHORN_EPS_TRAIN, **options).sum().backward()
        return True, run

    def packed_cost() -> torch.Tensor:
        """The cost as the model's training mode builds it (``cos``)."""
        def project(tokens: torch.Tensor) -> torch.Tensor:
            return unit_rows(model.head_str(tokens.float()))
        query_str, _ = pack_valid(query.tokens, query.kept, project)
        ref_str, _ = pack_valid(ref.tokens, ref.kept, project)
        return pairwise_cost(query_str, ref_str, "cos", unit=True)

    work = {
        "training step, padded float64": train(lambda: padded_distance(model, ref, query, SINKHORN_EPS_TRAIN)),
        "training step, new": train(lambda: new_distance(model, ref, query)),
        "head_str and cost alone (the step without the Sinkhorn), padded float64": train(
            lambda: model._token_cost(ref, query)),
        "head_str and cost alone (the step without the Sinkhorn), new": train(packed_cost),
        "Sinkhorn alone (training, w.r.t. the cost), padded float64": sinkhorn_alone(padded_sinkhorn_emd),
        "Sinkhorn alone (training, w.r.t. the cost), new": sinkhorn_alone(
            sinkhorn_emd, dtype=torch.float32, check_every=SINKHORN_CHECK_EVERY_TRAIN),
        "evaluation, padded float64": evaluate(lambda: padded_distance(model, ref, query, SINKHORN_EPS_EVAL)),
        "evaluation, new": evaluate(lambda: new_distance(model, ref, query)),
    }
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in work}
    for round_ in range(repeats + 1):
        for name, (training, run) in work.items():
            model.train(training)
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            synchronize(device)
            if round_:
                seconds[name]["wall"].append(time.perf_counter() - wall)
                seconds[name]["cpu"].append(time.process_time() - cpu)
    return seconds


def child(args: argparse.Namespace) -> None:
    """Times the new training step alone and prints ``{"cpu": s, "wall": s}`` a step (for ``--threads-table``)."""
    model = ViT_for_OSV_DSNet().to(args.device)
    ref, query, _ = inputs(args, model)
    ref, query = ref.to(args.device), query.to(args.device)
    model.train()

    def step() -> None:
        training_step(lambda: new_distance(model, ref, query), model)

    step()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(args.repeats):
        step()
    print(json.dumps({"cpu": (time.process_time() - cpu) / args.repeats,
                      "wall": (time.perf_counter() - wall) / args.repeats, "threads": torch.get_num_threads()}))


def threads_table(args: argparse.Namespace, rounds: int = 3) -> None:
    command = [sys.executable, __file__, "--child", "--batch-size", str(args.batch_size), "--repeats",
               str(args.repeats), "--seed", str(args.seed), "--tokens", args.tokens]
    if args.data_root is not None:
        command += ["--data-root", str(args.data_root)]
    results: dict[str, list[dict]] = {name: [] for name in THREAD_SETTINGS}
    # --busy: a process beside the table keeps one core busy, as a notebook or another job does on a shared machine.
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        for _ in range(rounds):
            for name, setting in THREAD_SETTINGS.items():
                environment = {key: value for key, value in os.environ.items()
                               if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")} | setting
                output = subprocess.run(command, env=environment, check=True, capture_output=True, text=True).stdout
                results[name].append(json.loads(output.strip().splitlines()[-1]))
    finally:
        if busy is not None:
            busy.kill()
    beside = "beside a process keeping one core busy" if args.busy else "on the machine as it is"
    print(f"\nNew training step, {args.batch_size} pairs, separate processes {beside}, {rounds} rounds interleaved "
          f"({args.repeats} steps each; median of the rounds)\n")
    print("| setting | torch threads | wall ms a step | CPU ms a step | CPU / wall |\n|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        wall = statistics.median(run["wall"] for run in runs)
        cpu = statistics.median(run["cpu"] for run in runs)
        print(f"| {name} | {runs[0]['threads']} | {1000 * wall:.1f} | {1000 * cpu:.1f} | {cpu / wall:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None, help="a CEDAR-layout folder for real kept masks")
    parser.add_argument("--tokens", choices=("random", "embed"), default=None,
                        help="token features (default: embed with --data-root, random without)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads-table", action="store_true", help="also time the step with 1, 2, 2 PASSIVE threads")
    parser.add_argument("--busy", action="store_true", help="run the threads table beside a process keeping one "
                        "core busy")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens is None:
        args.tokens = "embed" if args.data_root is not None else "random"
    if args.child:
        child(args)
        return

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = ViT_for_OSV_DSNet()
    ref, query, source = inputs(args, model)
    model, ref, query = model.to(device), ref.to(device), query.to(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    settings = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"))
    print(f"torch {torch.__version__}, {device}, torch threads {torch.get_num_threads()}, {settings}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{args.batch_size} pairs at 224 px ({GRID[0]}x{GRID[1]} tokens), {args.tokens} tokens, {source}; "
          f"kept a side: mean {ref.kept.sum(1).float().mean():.1f}, max {int(ref.kept.sum(1).max())} (reference), "
          f"mean {query.kept.sum(1).float().mean():.1f}, max {int(query.kept.sum(1).max())} (query)\n")

    rows = agreement(model, ref, query) + sync_counts(model, ref, query)
    seconds = timings(model, ref, query, args.repeats, device)
    per_pair = {name: {clock: 1000 * statistics.median(values) / args.batch_size for clock, values in clocks.items()}
                for name, clocks in seconds.items()}
    for name, clocks in per_pair.items():
        rows.append((f"{name}, ms a pair, wall / CPU (medians of {args.repeats})",
                     f"{clocks['wall']:.3f} / {clocks['cpu']:.3f}"))
    for kind in ("training step", "head_str and cost alone (the step without the Sinkhorn)",
                 "Sinkhorn alone (training, w.r.t. the cost)", "evaluation"):
        old, new = per_pair[f"{kind}, padded float64"], per_pair[f"{kind}, new"]
        rows.append((f"{kind} speed-up, padded / new, wall / CPU",
                     f"{old['wall'] / new['wall']:.2f}x / {old['cpu'] / new['cpu']:.2f}x"))
    print("| measurement | value |\n|---|---:|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    if args.threads_table:
        threads_table(args)


if __name__ == "__main__":
    main()
