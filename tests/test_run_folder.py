"""A run folder that survives anything: kill -9 at the commit points, flipped bits, two processes, an interrupted
PART 7, copied folders, and one clear line for each bad input.

The kills are real: ``finetune.py train`` in a subprocess that sends itself
SIGKILL right after a given checkpoint is renamed into place (nothing after
that line runs: no clean-up, no ``finally``), then the same command again. Its
results must equal an uninterrupted run's, every tensor (``torch.equal``).

A process of its own where the test is about one (a kill, a second process, a file-size limit); the other
commands run ``finetune.main`` in this process (``train_here``), the same code without a Python start-up
and torch import each. The uninterrupted run is the session's ``reference_run`` (tests/conftest.py).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import RUN_FLAGS, assert_equal_values, flip_middle_bytes, main_printing_warnings, run_config

from model_v3 import ViT_for_OSV_DSNet, load_pretrained
from models.fine_tune_utils import setup_head_only_finetune, unfreeze_last_blocks
from models.weights import read_torch_file
from module.run import lock as run_lock
from module.run.checkpoint import read_checkpoint, trained_state_keys
from module.run.folder import RunFolderError
from module.run.lock import RunFolderInUse, lock_run_folder
from training_utils import (
    FinetuneConfig,
    build_datasets,
    build_model,
    fit,
    load_trained_model,
    prepare_run,
    train_and_report,
)

ROOT = Path(__file__).resolve().parents[1]
# keep_last=1: the newest epoch checkpoint, and the best one, which must never be pruned.
TRAINING = RUN_FLAGS
REPORT = ("val_metrics.json", "test_metrics.json")

# Runs finetune.py's main, and SIGKILLs itself right after the file named by argv[1] is renamed into place.
KILLED_RIGHT_AFTER = textwrap.dedent("""
    import os, signal, sys
    target, project = sys.argv[1], sys.argv[2]
    replace = os.replace

    def replace_then_die(source, destination, *args, **kwargs):
        replace(source, destination, *args, **kwargs)
        if os.path.basename(destination) == target:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_die
    sys.path.insert(0, project)
    import finetune
    sys.exit(finetune.main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def corpus(cedar_corpus: Path) -> Path:
    """5 writers x (4 genuine + 4 forged), 64 px; the validation EER improves in epoch 1 (a new best), not in 2."""
    return cedar_corpus


def finetune(*args: str | Path, kill_after: str | None = None, **options: Any) -> subprocess.CompletedProcess:
    """``finetune.py`` in a process of its own, with this process's torch threads: the float sums of what it
    writes are those of the runs made here, which its results are compared with bit for bit."""
    command = [sys.executable, str(ROOT / "finetune.py")] if kill_after is None else \
        [sys.executable, "-c", KILLED_RIGHT_AFTER, kill_after, str(ROOT)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([*command, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=environment, **options)


def train(corpus: Path, out: Path, *extra: str, kill_after: str | None = None, **options: Any) -> subprocess.CompletedProcess:
    return finetune("train", "cedar", corpus, "--out", out, *TRAINING, *extra, kill_after=kill_after, **options)


@pytest.fixture
def finetune_here(capsys: pytest.CaptureFixture) -> Any:
    """``finetune_here(*args)``: ``finetune.main(args)`` in this process, as a ``CompletedProcess`` (exit status,
    stdout, stderr); the warnings it gives are on its stderr first, as the command prints them (``warning: ...``)."""
    def run(*args: str | Path) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code, shown = main_printing_warnings([str(arg) for arg in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, shown + captured.err)
    return run


@pytest.fixture
def train_here(finetune_here: Any) -> Any:
    """``train_here(corpus, out, *extra)``: ``train`` in this process."""
    def run(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return finetune_here("train", "cedar", corpus, "--out", out, *TRAINING, *extra)
    return run


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and message.startswith("error: "), result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [message]
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> Path:
    """An uninterrupted run (``train_and_report`` of the settings ``TRAINING`` gives ``finetune.py train``): what
    every interrupted one must end with."""
    return reference_run


def assert_same_results(folder: Path, reference: Path) -> None:
    """best.pt, best_weights.pth, metrics, history and the folder's files are those of the reference run."""
    for name in ("best.pt", "best_weights.pth"):
        assert_equal_values(read_torch_file(folder / name), read_torch_file(reference / name), name)
    for name in (*REPORT, "history.json"):
        assert_equal_values(json.loads((folder / name).read_text()), json.loads((reference / name).read_text()), name)
    assert sorted(path.name for path in folder.iterdir()) == sorted(path.name for path in reference.iterdir())


def flip_bits(path: Path) -> None:
    flip_middle_bytes(path, 16)


# --------------------------------------------------------------------------- what a checkpoint holds

def test_head_only_checkpoints_are_small_and_best_weights_is_the_whole_model(reference: Path) -> None:
    assert sorted(path.name for path in reference.glob("*.pt")) == ["best.pt", "epoch_0001.pt", "epoch_0002.pt"]
    assert read_checkpoint(reference / "best.pt")["epoch"] == 1  # kept although keep_last=1: the best epoch's
    for path in [*reference.glob("epoch_*.pt"), reference / "best.pt"]:
        assert path.stat().st_size < 1_000_000, (path.name, path.stat().st_size)
        assert list(read_checkpoint(path)["trained_state_dict"]) == ["head_str.weight", "head_str.bias"]
    model = load_pretrained(ViT_for_OSV_DSNet(), reference / "best_weights.pth", strict=True)
    best = read_checkpoint(reference / "best.pt")["trained_state_dict"]
    assert all(torch.equal(model.state_dict()[key], value) for key, value in best.items())


def test_unfrozen_blocks_are_in_the_checkpoint() -> None:
    model = setup_head_only_finetune(ViT_for_OSV_DSNet())
    unfreeze_last_blocks(model, 1)
    keys = trained_state_keys(model)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert set(trainable) <= set(keys) and {"model.norm.weight", "head_str.weight"} <= set(keys)
    assert all(key.startswith(("head_str.", "model.norm.", "model.blocks4.")) for key in keys)


# --------------------------------------------------------------------------- kill -9 at the commit points

def test_kill_right_after_the_first_epoch_checkpoint(corpus: Path, reference: Path, tmp_path: Path,
                                                     train_here: Any) -> None:
    out = tmp_path / "run"
    killed = train(corpus, out, kill_after="epoch_0000.pt")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "epoch_0000.pt").is_file() and not (out / "best.pt").exists()  # killed before best.pt existed

    again = train_here(corpus, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr and "after epoch 0" in again.stdout + again.stderr
    assert_same_results(out, reference)


def test_kill_right_after_a_new_best_epoch_checkpoint(corpus: Path, reference: Path, tmp_path: Path,
                                                       train_here: Any) -> None:
    val_eer = json.loads((reference / "history.json").read_text())["val_eer"]
    assert val_eer[1] < 0.99 * val_eer[0], "epoch 1 must be a new best for this test to mean anything"
    out = tmp_path / "run"
    killed = train(corpus, out, kill_after="epoch_0001.pt")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert read_checkpoint(out / "best.pt")["epoch"] == 0  # best.pt is one epoch behind when the kill comes

    again = train_here(corpus, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "best.pt made again from epoch_0001.pt" in again.stdout + again.stderr
    assert_same_results(out, reference)


# --------------------------------------------------------------------------- damaged files

def test_a_flipped_bit_in_the_newest_checkpoint_is_detected_and_the_previous_one_used(
        corpus: Path, reference: Path, tmp_path: Path, train_here: Any) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    flip_bits(out / "epoch_0002.pt")
    again = train_here(corpus, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "warning: skipping checkpoint epoch_0002.pt" in again.stderr and "damaged" in again.stderr
    assert "after epoch 1" in again.stdout + again.stderr
    assert_same_results(out, reference)


def test_a_damaged_best_pt_is_refused_by_evaluate_and_verify_and_made_again_by_train(
        corpus: Path, reference: Path, tmp_path: Path, finetune_here: Any, train_here: Any) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    flip_bits(out / "best.pt")
    scan = corpus / "full_org" / "original_1_1.png"
    for result in (finetune_here("evaluate", "--run", out), finetune_here("verify", scan, scan, "--run", out)):
        one_line_error(result, f"{out / 'best.pt'} is damaged", "run the same command again")
    again = train_here(corpus, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "best.pt made again" in again.stdout + again.stderr
    assert_same_results(out, reference)


def test_no_readable_checkpoint_stops_and_keeps_best_pt(corpus: Path, reference: Path, tmp_path: Path,
                                                        train_here: Any) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for path in out.glob("epoch_*.pt"):
        flip_bits(path)
    (out / "best.pt.sha256").unlink()
    best = (out / "best.pt").read_bytes()
    message = one_line_error(train_here(corpus, out), "epoch_0002.pt", "best.pt", "no checkpoint to continue from",
                             "--no-resume")
    assert "resume=False" not in message
    assert (out / "best.pt").read_bytes() == best and not list(out.glob("previous-*"))


def test_leftovers_of_interrupted_writes_are_removed_when_a_run_starts(corpus: Path, tmp_path: Path) -> None:
    config = FinetuneConfig(data_root=str(corpus), ckpt_dir=str(tmp_path), image_size=64, device="cpu")
    leftovers = [tmp_path / ".epoch_0003.pt.k2j4.tmp", tmp_path / "epoch_0003.pt.sha256"]  # a write cut short
    for path in leftovers:
        path.write_text("left by a killed process")
    prepare_run(ViT_for_OSV_DSNet(config), config)
    assert not any(path.exists() for path in leftovers)


# --------------------------------------------------------------------------- one process per run folder

def test_a_second_process_on_a_locked_folder_exits_at_once(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with lock_run_folder(out):
        with lock_run_folder(out):  # re-entrant within the process that holds it
            result = train(corpus, out)
    one_line_error(result, f"error: {out} is in use by process {os.getpid()}")
    assert not list(out.glob("epoch_*")), "the second process must stop before any work"
    with lock_run_folder(out):  # released
        pass


def test_where_file_locks_are_not_supported_a_claim_file_stands_in(tmp_path: Path, monkeypatch) -> None:
    def no_file_locks(*args) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_file_locks)
    claim = tmp_path / run_lock.CLAIM_FILE
    with lock_run_folder(tmp_path):
        assert claim.read_text().split()[0] == str(os.getpid())
    assert not claim.exists()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim.write_text(f"{sleeper.pid} {run_lock.socket.gethostname()}\n")  # a live process of this machine
        with pytest.raises(RunFolderInUse, match=f"is in use by process {sleeper.pid}"):
            with lock_run_folder(tmp_path):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match=f"process {sleeper.pid}, which claimed the folder, is gone"):
        with lock_run_folder(tmp_path):  # a dead process's claim is taken over
            pass
    claim.write_text("1234 another-machine\n")
    with pytest.raises(RunFolderInUse, match=f"on another-machine .*delete {claim}"):
        with lock_run_folder(tmp_path):
            pass


# --------------------------------------------------------------------------- interrupting PART 7, in one process

class InterruptedTraining(torch.nn.Module):
    """A loss that raises KeyboardInterrupt (Colab's stop button) at its ``at``-th training call."""

    def __init__(self, loss: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.loss, self.at, self.calls = loss, at, 0

    def forward(self, distance: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        return self.loss(distance, labels)


def test_running_part_7_again_after_a_stop_gives_the_uninterrupted_result(corpus: Path, reference: Path,
                                                                          tmp_path: Path) -> None:
    # The uninterrupted result is ``reference``: train_and_report of these settings, which builds the model and the
    # datasets as PARTs 4 and 5 do.
    # The notebook: PART 4 builds the model, PART 5 the datasets, PART 7 is stopped in the middle of epoch 2.
    config = run_config(corpus, tmp_path / "parts")
    model, datasets = build_model(config), build_datasets(config)
    batches = -(-len(datasets["train"]) // config.batch_size)
    loss = model.loss_fn
    model.loss_fn = InterruptedTraining(loss, at=batches + 2)
    with pytest.raises(KeyboardInterrupt):
        train_and_report(config, model=model, datasets=datasets, progress=False)
    model.loss_fn = loss
    head = model.head_str.weight.detach().clone()
    assert not torch.equal(head, read_checkpoint(tmp_path / "parts" / "epoch_0001.pt")["trained_state_dict"]
                           ["head_str.weight"])  # the model in memory went on training after the last checkpoint
    torch.rand(10)  # whatever runs in between must not matter

    train_and_report(config, model=model, datasets=datasets, progress=False)  # PART 7 again
    assert_same_results(tmp_path / "parts", reference)


def test_fit_reloads_the_last_checkpoint_after_an_interruption(corpus: Path, tmp_path: Path, capsys) -> None:
    config = run_config(corpus, tmp_path / "whole")
    datasets = build_datasets(config, splits=("train", "val"))
    expected = fit(prepare_run(build_model(config), config), datasets["train"], datasets["val"], progress=False)

    config = run_config(corpus, tmp_path / "parts")
    run = prepare_run(build_model(config), config)
    loss = run.model.loss_fn
    run.model.loss_fn = InterruptedTraining(loss, at=2)  # in epoch 1, after one optimizer step
    with pytest.raises(KeyboardInterrupt):
        fit(run, datasets["train"], datasets["val"], progress=False)
    run.model.loss_fn = loss
    assert run.uncommitted_epoch == 1
    fit(run, datasets["train"], datasets["val"], progress=False)  # the same run object, not prepare_run
    assert "epoch 1 was interrupted: continuing from the last checkpoint, epoch_0000.pt" in capsys.readouterr().out
    assert_equal_values(run.history, expected.history, "history")
    assert_equal_values(read_torch_file(tmp_path / "parts" / "best.pt")["trained_state_dict"],
                        read_torch_file(tmp_path / "whole" / "best.pt")["trained_state_dict"], "best.pt")
    assert_equal_values(run.optimizer.state_dict(), expected.optimizer.state_dict(), "optimizer")


# --------------------------------------------------------------------------- a run folder elsewhere

def test_a_copied_run_folder_loads_without_its_base_weights(corpus: Path, tmp_path: Path) -> None:
    weights = tmp_path / "pretrained.pth"
    torch.manual_seed(11)
    torch.save(ViT_for_OSV_DSNet().state_dict(), weights)
    config = run_config(corpus, tmp_path / "run", epochs=1, warmup_epochs=0, pretrained=str(weights))
    trained = train_and_report(config, progress=False).model.state_dict()

    copy = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "run", copy)
    weights.rename(tmp_path / "moved.pth")  # another machine: the base weights are not where they were
    loaded_config, model = load_trained_model(copy)
    assert loaded_config.ckpt_dir == str(copy.absolute())
    assert all(torch.equal(value, trained[key]) for key, value in model.state_dict().items())
    with pytest.raises(RunFolderError, match=f"cannot rebuild the model of {copy / 'best.pt'}.*best_weights.pth: "
                                             "checkpoint not found.*pretrained weights .*not found"):
        (copy / "best_weights.pth").unlink()
        load_trained_model(copy)
    (tmp_path / "moved.pth").rename(weights)
    _, model = load_trained_model(copy)  # from the base weights, where they are again
    assert all(torch.equal(value, trained[key]) for key, value in model.state_dict().items())

    # Resuming on other base weights is refused: the checkpoint's fingerprint names what it applies to.
    torch.manual_seed(12)
    torch.save(ViT_for_OSV_DSNet().state_dict(), weights)
    with pytest.raises(RunFolderError, match="trained on other frozen weights .*The run's pretrained weights: "):
        prepare_run(build_model(config), config)


def test_a_fresh_backbone_run_is_rebuilt_from_its_seed(reference: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    (copy / "best_weights.pth").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, model = load_trained_model(copy)
    assert_equal_values(model.state_dict(), read_torch_file(reference / "best_weights.pth"), "model")


# --------------------------------------------------------------------------- one line for each bad input

def test_bad_input_is_one_line_naming_the_file_line_or_flag(corpus: Path, reference: Path, tmp_path: Path,
                                                            finetune_here: Any, train_here: Any) -> None:
    # --out naming a file: refused before any work.
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    one_line_error(train_here(corpus, a_file), f"--out {a_file} is a file, not a folder")

    # Changed settings: the fix in the command line's words.
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    message = one_line_error(train_here(corpus, out, "--lr", "2e-2"), "lr: checkpoint 0.01, now 0.02", "--no-resume",
                             "another --out folder")
    assert "resume=False" not in message
    with pytest.raises(RunFolderError, match=r"lr: checkpoint 0.01, now 0.02[\s\S]*start over with resume=False"):
        prepare_run(build_model(run_config(corpus, out)), run_config(corpus, out, lr=2e-2))

    # A pair file with a byte that is not UTF-8: the file and the line.
    latin1 = tmp_path / "latin1"
    shutil.copytree(corpus, latin1)
    lines = (latin1 / "gray_train.txt").read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"original", b"origin\xe9l", 1)
    (latin1 / "gray_train.txt").write_bytes(b"\n".join(lines))
    one_line_error(train_here(latin1, tmp_path / "latin1_run"), "gray_train.txt", "line 3: byte 0xe9", "not UTF-8")

    # A checkpoint that needs pickled code: the whole reason, and how to re-save it.
    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    one_line_error(finetune_here("evaluate", "--run", pickled), str(pickled), "holds pickled Python objects",
                   "(torch.nn.modules.linear.Linear)", "re-save only its weights",
                   "torch.save(torch.load(path, weights_only=False)['model_state_dict'], 'weights.pth')")


def test_a_full_disk_names_the_file(corpus: Path, tmp_path: Path) -> None:
    """A file-size limit stands in for a full disk: writing the first checkpoint (0.5 MB) fails part-way."""
    resource = pytest.importorskip("resource")
    out = tmp_path / "run"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    one_line_error(train(corpus, out, preexec_fn=small_files), f"cannot write {out / 'epoch_0000.pt'}")
    assert not list(out.glob(".*.tmp")), "the temporary file of the failed write is removed"
