"""torchrun with 2 CPU processes (gloo) gives the result of 1 process, resumes after a kill, and refuses a run
folder in use in one line.

Small on purpose (64 px, a tiny corpus, 2 epochs): each command is a real
``finetune.py train``, one started by ``python``, the others by ``torchrun``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model_v3 import ViT_for_OSV_DSNet
from models.data_init import data_init_keys
from models.weights import read_torch_file
from module.run.lock import lock_run_folder
from prepare_datasets import ensure_pair_files, make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
# The default peak lr: Adam turns the float-order noise of a near-zero gradient into a step of up to lr, so the
# 1 vs 2 process difference grows with it (6.7e-6 at lr 4e-3, 6.8e-7 at 4e-4, against weights that move 4e-3).
TRAINING = ["--image-size", "64", "--epochs", "2", "--batch-size", "8", "--lr", "4e-4", "--warmup-epochs", "0",
            "--device", "cpu", "--keep-last", "3", "--num-workers", "0"]


def train(corpus: Path, out: Path, *options: str, processes: int = 1, wait: bool = True, check: bool = True):
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, str(ROOT / "finetune.py"), "train", "cedar", str(corpus), "--out", str(out), *TRAINING,
               *options]
    # OMP_NUM_THREADS=1 as torchrun sets it, so that one process and two use the same kernels.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def epochs_of(run: Path) -> list[dict]:
    return [read_torch_file(run / f"epoch_{epoch:04d}.pt") for epoch in (1, 2)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 writers: 3 train (72 pairs), 1 validation, 2 test."""
    root = tmp_path_factory.mktemp("cedar")
    make_synthetic_dataset(root, "cedar", n_writers=6, n_genuine=4, n_forged=4, seed=2, image_size=96, progress=False)
    ensure_pair_files("cedar", root, val_ratio=0.2, random_state=1, train_ratio=0.67)
    return root


@pytest.fixture(scope="module")
def two_process_per_pair_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(run folder, result)`` of one uninterrupted 2-process per-pair run, which two tests compare with."""
    out = tmp_path_factory.mktemp("two-process-per-pair") / "run"
    return out, train(corpus, out, "--per-pair", processes=2)


@pytest.mark.parametrize("path", [
    ["--per-pair"],
    ["--fast-head-only"],
    # The last block trains from the cut-point store, at the head's lr so that it moves as far (see the end).
    ["--fast-head-only", "--finetune", "last:1", "--lr-blocks", "4e-4"],
], ids=["per-pair", "fast-head-only", "fast-last-1"])
def test_two_processes_train_as_one(corpus: Path, tmp_path: Path, path: list[str],
                                    request: pytest.FixtureRequest) -> None:
    """The per-pair path with augmentation (each pair's augmentation seeded by the pair and the epoch), the
    fast path (the embedding shared between the processes), and the fast path of ``last:1`` (the features at the
    last block's input, stored by both processes): the same weights to within float summation order, the same
    validation EER every epoch."""
    alone = train(corpus, tmp_path / "one", *path)
    if path == ["--per-pair"]:
        two_processes, together = request.getfixturevalue("two_process_per_pair_run")
    else:
        two_processes, together = tmp_path / "two", train(corpus, tmp_path / "two", *path, processes=2)
    assert "Best model" in alone.stdout and together.stdout.count("Best model") == 1  # rank 0 reports
    for one, two in zip(epochs_of(tmp_path / "one"), epochs_of(two_processes)):
        # What data parallelism must reproduce: the gradients, here through Adam's running averages of them and
        # of their squares (within float summation order). The weights themselves are not compared element by
        # element: Adam's first steps move a coordinate whose gradient is near zero by +-lr whatever the sign of
        # its rounding, so on some CPUs a few of 36,864 weights differ by up to 2 lr (measured 3.8e-5 at lr 4e-4).
        moments = zip(one["optimizer_state_dict"]["state"].values(), two["optimizer_state_dict"]["state"].values())
        for alone_state, together_state in moments:
            for name in ("exp_avg", "exp_avg_sq"):
                # Within 0.1 % of the largest: rounding moves them by ~1e-5 of it; a wrong gradient, by all of it.
                scale = alone_state[name].abs().max()
                torch.testing.assert_close(together_state[name], alone_state[name], rtol=1e-3, atol=1e-3 * scale)
        assert two["history"]["val_eer"] == one["history"]["val_eer"]
        # The losses follow the weights, which Adam moves apart by its rounding in a few coordinates (see above):
        # 1.04e-6 relative measured on one CPU, 1e-7 on another; a wrong gradient would move them by percents.
        assert two["history"]["train_loss"][1:] == pytest.approx(one["history"]["train_loss"][1:], rel=1e-5)
        assert {**two["config"], "ckpt_dir": ""} == {**one["config"], "ckpt_dir": ""}
    assert 0 < epochs_of(tmp_path / "one")[1]["history"]["val_eer"][-1] < 1, "a validation set that can tell"
    start = read_torch_file(tmp_path / "one" / "epoch_0000.pt")["trained_state_dict"]
    end = epochs_of(tmp_path / "one")[1]["trained_state_dict"]
    # What trains, all of it: not the tensors the data-dependent initialisation set before training, which the
    # checkpoint holds too (in last:1 the final norm trains, but its bias gets no gradient: the l2 distance of the
    # mean tokens cancels it).
    from_data = set(data_init_keys(ViT_for_OSV_DSNet()))
    trained = [key for key in end if key not in from_data]
    assert all((end[key] - start[key]).abs().max() > 1e-3 for key in trained), "the weights must move well past 1e-5"


def workers_of(job: subprocess.Popen) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's worker processes (its children; Linux's ``/proc``)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == job.pid:
                environment = (entry / "environ").read_bytes().split(b"\0")
                ranks[int(next(v for v in environment if v.startswith(b"RANK="))[5:])] = int(entry.name)
        except (OSError, ValueError, StopIteration):
            continue  # not a process, gone meanwhile, or not a worker
    return ranks


def test_a_killed_two_process_run_resumes_to_the_same_result(corpus: Path, tmp_path: Path,
                                                             two_process_per_pair_run) -> None:
    """Rank 1 killed during epoch 2: torchrun ends the job with an error; the same command resumes after epoch 1
    and ends where an uninterrupted run ends, bit for bit."""
    whole, _ = two_process_per_pair_run

    parts = tmp_path / "parts"
    job = train(corpus, parts, "--per-pair", processes=2, wait=False)
    deadline = time.monotonic() + 300
    while not (parts / "epoch_0001.pt").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed"
    os.kill(workers_of(job)[1], signal.SIGKILL)
    assert job.wait(timeout=120) != 0, "a job that lost a rank must fail"
    assert not (parts / "epoch_0002.pt").exists()

    resumed = train(corpus, parts, "--per-pair", processes=2)
    assert "after epoch 1 of 2" in resumed.stdout
    for expected, got in zip(epochs_of(whole), epochs_of(parts)):
        assert all(torch.equal(got["trained_state_dict"][key], value)
                   for key, value in expected["trained_state_dict"].items())
        assert got["history"]["val_eer"] == expected["history"]["val_eer"]


def test_workers_end_when_torchrun_is_killed(corpus: Path, tmp_path: Path) -> None:
    """``kill -9`` of torchrun alone: its workers (in sessions of their own) notice within a second and end."""
    job = train(corpus, tmp_path / "run", "--per-pair", "--epochs", "50", processes=2, wait=False)
    deadline = time.monotonic() + 300
    while len(workers_of(job)) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = workers_of(job)
    assert len(workers) == 2, "the job did not start its workers"
    while not (tmp_path / "run" / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the workers are past joining the process group, where the watch starts
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    gone_by = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers.values()) and time.monotonic() < gone_by:
        time.sleep(0.2)
    alive = [pid for pid in workers.values() if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"workers {alive} outlived torchrun by 10 s"


# torchrun's own log lines ("E1202 01:11:14.520000 11130 .../api.py:1002] failed ...").
TORCHRUN_LOG = re.compile(r"^[EWI]\d{4} ")


def test_a_run_folder_in_use_is_refused_in_one_line(corpus: Path, tmp_path: Path) -> None:
    """Rank 0 prints the one ``error:`` line; the other worker ends at once, silently and with status 0 (one
    failing first would make torchrun stop rank 0 before it said why). What follows is torchrun's, which no worker
    can silence: it reports rank 0's status 1 in one log line and the traceback of its ChildFailedError."""
    out = tmp_path / "run"
    with lock_run_folder(out):
        result = train(corpus, out, "--per-pair", processes=2, check=False)
    assert result.returncode == 1 and not list(out.glob("epoch_*"))
    lines = result.stderr.splitlines()
    torchrun_starts = next(index for index, line in enumerate(lines) if TORCHRUN_LOG.match(line))
    assert lines[:torchrun_starts] == [f"error: {out} is in use by process {os.getpid()}: one process at a time writes "
                                       "a run folder; wait for it to end, stop it, or use another run folder"]
    torchrun = lines[torchrun_starts:]
    assert [line for line in torchrun if TORCHRUN_LOG.match(line)] == [torchrun[0]]  # no SIGTERM sent, no waiting
    assert "failed (exitcode: 1) local_rank: 0" in torchrun[0] and torchrun[1] == "Traceback (most recent call last):"
    summary = "\n".join(torchrun[torchrun.index("Failures:"):])
    assert "<NO_OTHER_FAILURES>" in summary and "rank      : 0 (local_rank: 0)" in summary and "exitcode  : 1" in summary
    assert "terminated" not in result.stderr and result.stdout == ""
