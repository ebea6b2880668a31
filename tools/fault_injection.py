"""Kill a small training run, and ``prepare``, with SIGKILL at random instants, run the same command again, compare
with an uninterrupted run.

    python tools/fault_injection.py [--kills 30] [--prepare-kills 10] [--seed 0] [--work DIR]

A synthetic corpus (5 writers, 64 px) and one uninterrupted
``finetune.py train`` run give the reference. Then each trial starts the
same command in a fresh run folder and kills it 1 to 3 times, each time
either at a random instant of the run or at the first write that starts
after a random instant (a temporary file of ``module/core/io.atomic_write``
seen in the run folder or its feature store: the kill lands while a
checkpoint, checksum, metrics file, report, plot, ``best_weights.pth`` or a
feature-store chunk is being written); after the last kill the command runs
to its end. The trial's folder must hold the reference's file names, and
the same files: ``best.pt`` every tensor (``torch.equal``), ``history.json``
its values, the wall times of the epochs aside, and every report (metrics
JSON, per-writer CSV, plots, manifests, calibration, ``best_weights.pth``)
byte for byte. ``--prepare-kills`` does the same to
``finetune.py prepare cedar`` replacing a folder's pair files made with other
options: after the kills and one more run, the pair files and their record
must equal an uninterrupted prepare's, byte for byte, with nothing left
behind. Prints the counts and exits 1 when any trial differs.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from models.weights import read_torch_file
from module.core.io import TEMPORARY_SUFFIX
from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset

TRAINING = ["--image-size", "64", "--epochs", "3", "--batch-size", "16", "--lr", "1e-2", "--device", "cpu",
            "--keep-last", "1"]
IGNORED_KEYS = ("seconds", "ckpt_dir")  # wall times, and the run folder's own path
# Files holding the epochs' wall times: best.pt and history.json are compared by value; every other file byte for byte.
WALL_TIMES = re.compile(r"^(epoch_\d+\.pt|best\.pt)(\.sha256)?$|^history\.json$")


def command(data: Path, out: Path) -> list[str]:
    return [sys.executable, str(PROJECT / "finetune.py"), "train", "cedar", str(data), "--out", str(out), *TRAINING]


def differences(actual: Any, expected: Any, where: str) -> list[str]:
    """Where two loaded files differ: tensors by torch.equal, other values by ==."""
    if isinstance(expected, torch.Tensor):
        return [] if isinstance(actual, torch.Tensor) and torch.equal(actual, expected) else [where]
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return [f"{where} (keys)"]
        return [found for key in expected if key not in IGNORED_KEYS
                for found in differences(actual[key], expected[key], f"{where}[{key!r}]")]
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return [f"{where} (length)"]
        return [found for index, pair in enumerate(zip(actual, expected)) for found in differences(*pair, f"{where}[{index}]")]
    return [] if actual == expected else [where]


def compare(folder: Path, reference: Path) -> list[str]:
    names, expected = sorted(p.name for p in folder.iterdir()), sorted(p.name for p in reference.iterdir())
    if names != expected:
        return [f"files: {names} != {expected}"]
    found = differences(read_torch_file(folder / "best.pt"), read_torch_file(reference / "best.pt"), "best.pt")
    found += differences(json.loads((folder / "history.json").read_text()),
                         json.loads((reference / "history.json").read_text()), "history.json")
    return found + [name for name in expected if (reference / name).is_file() and not WALL_TIMES.match(name)
                    and (folder / name).read_bytes() != (reference / name).read_bytes()]


def temporary_files(folder: Path) -> list[str]:
    """The temporary files of writes in progress in ``folder`` and below (the feature store is inside a run folder),
    and a prepare's staging folder."""
    if not folder.is_dir():
        return []
    return [path.name for path in folder.rglob(f".*{TEMPORARY_SUFFIX}")] + \
        [name for name in (".prepare-staging",) if (folder / name).exists()]


def run_and_kill(cmd: list[str], out: Path, delay: float, during_write: bool) -> dict[str, Any]:
    """Start ``cmd``, SIGKILL it after ``delay`` s (or at the first write after it); what happened."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + delay
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if during_write:
        while process.poll() is None and not temporary_files(out):
            time.sleep(0.0005)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    left = temporary_files(out)
    return {"killed": killed, "in_write": killed and bool(left), "left": left}


PREPARE_OLD = ["--val-ratio", "0.25", "--seed", "1"]
PREPARE_NEW = ["--val-ratio", "0.5", "--seed", "3"]


def prepare_command(root: Path, options: list[str]) -> list[str]:
    return [sys.executable, str(PROJECT / "finetune.py"), "prepare", "cedar", str(root), *options]


def root_files(root: Path) -> dict[str, bytes]:
    """The files directly in a dataset root: pair files, their record, anything a prepare left behind."""
    return {path.name: path.read_bytes() for path in root.iterdir() if path.is_file() or path.name.startswith(".")}


def prepare_trials(data: Path, work: Path, kills_wanted: int, draw: random.Random) -> dict[str, Any]:
    """Kill ``prepare`` (replacing pair files made with other options) ``kills_wanted`` times, each trial ended by
    one more run; compare each trial's root with an uninterrupted prepare's."""
    import shutil

    def fresh(name: str) -> Path:
        root = work / name
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(data, root, ignore=shutil.ignore_patterns("gray_*.txt", "pair_files.json"))
        subprocess.run(prepare_command(root, PREPARE_OLD), capture_output=True, check=True)
        return root

    reference = fresh("prepare_reference")
    start = time.monotonic()
    subprocess.run(prepare_command(reference, PREPARE_NEW), capture_output=True, check=True)
    seconds = time.monotonic() - start
    expected = root_files(reference)
    totals = {"prepare kills": 0, "prepare kills during a write": 0, "prepare trials": 0, "prepare trials equal": 0}
    failures = []
    while totals["prepare kills"] < kills_wanted:
        root = fresh(f"prepare_trial_{totals['prepare trials'] + 1:03d}")
        outcome = run_and_kill(prepare_command(root, PREPARE_NEW), root, draw.uniform(0, seconds), draw.random() < 0.7)
        if not outcome["killed"]:
            continue
        totals["prepare kills"] += 1
        totals["prepare kills during a write"] += outcome["in_write"]
        final = subprocess.run(prepare_command(root, PREPARE_NEW), capture_output=True, text=True)
        totals["prepare trials"] += 1
        equal = final.returncode == 0 and root_files(root) == expected
        totals["prepare trials equal"] += equal
        if not equal:
            failures.append(f"{root.name}: exit {final.returncode}, files {sorted(root_files(root))}")
        print(f"{root.name}: {'equal' if equal else 'DIFFERENT'} (killed during {outcome['left'] or 'no write'})",
              flush=True)
    return {**totals, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="kills to deliver (default %(default)s)")
    parser.add_argument("--prepare-kills", type=int, default=10, help="kills of prepare (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill instants (default %(default)s)")
    parser.add_argument("--work", default=None, help="folder for the corpus and the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    draw = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="fault_injection_"))
    data = work / "data"
    if not (data / "gray_train.txt").is_file():
        make_synthetic_dataset(data, "cedar", n_writers=5, n_genuine=4, n_forged=4, seed=3, image_size=96, progress=False)
        generate_cedar_pairs(data, train_ratio=0.5, val_ratio=0.25)

    reference = work / "reference"
    start = time.monotonic()
    finished = subprocess.run(command(data, reference), capture_output=True, text=True)
    run_seconds = time.monotonic() - start
    if finished.returncode != 0:
        print(finished.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"reference run: {run_seconds:.1f} s, in {reference}")

    # Each kill is followed by a run of the same command (killed again, or run to its end).
    totals = {"kills": 0, "kills during a write": 0, "runs after a kill": 0, "resumed from a checkpoint": 0,
              "trials": 0, "trials equal": 0}
    written: dict[str, int] = {}
    failures = []
    while totals["kills"] < args.kills:
        trial = work / f"trial_{totals['trials'] + 1:03d}"
        kills_wanted = draw.randint(1, 3)
        kills = 0
        while kills < kills_wanted:
            during_write = draw.random() < 0.5
            outcome = run_and_kill(command(data, trial), trial, draw.uniform(0, run_seconds), during_write)
            if not outcome["killed"]:  # the run ended before the kill came: start the trial's count again
                continue
            kills += 1
            totals["kills"] += 1
            totals["runs after a kill"] += 1
            totals["kills during a write"] += outcome["in_write"]
            for name in outcome["left"]:  # .NAME.<random>.tmp
                target = re.sub(r"\d{4}", "NNNN", name[1:].rsplit(".", 2)[0])
                written[target] = written.get(target, 0) + 1
        final = subprocess.run(command(data, trial), capture_output=True, text=True)
        totals["trials"] += 1
        totals["resumed from a checkpoint"] += "resumed from" in final.stdout + final.stderr
        found = compare(trial, reference) if final.returncode == 0 else [f"exit {final.returncode}: {final.stderr[-500:]}"]
        totals["trials equal"] += not found
        if found:
            failures.append(f"{trial.name}: {found[:5]}")
        print(f"{trial.name}: {kills} kill(s), {'equal' if not found else 'DIFFERENT: ' + str(found[:3])}", flush=True)

    prepared = prepare_trials(data, work, args.prepare_kills, draw) if args.prepare_kills else {}
    failures += prepared.pop("failures", [])
    print("\n" + "\n".join(f"{name:>26}: {value}" for name, value in {**totals, **prepared}.items()))
    print(f"{'killed while writing':>26}: {', '.join(f'{name} {count}' for name, count in sorted(written.items()))}")
    print(f"{'total time':>26}: {time.monotonic() - start:.0f} s")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
