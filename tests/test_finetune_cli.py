"""finetune.py on tiny synthetic corpora: each subcommand as a user runs it (a subprocess), and each bad input
(in this process, through ``finetune.main``: the same code without a Python start-up and torch import a case). A
command that a test runs again, or whose point is not the process (a 16-bit scan, writer-level figures), runs in
this process too, its warnings on its stderr as the command prints them."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import main_printing_warnings

import finetune as finetune_cli
from module.data.datasets import pair_kind
from module.data.pair_files import read_pair_file
from module.evaluation.calibration import load_calibration, verbal_equivalent
from module.evaluation.validation import reference_trials
from module.run.config import FinetuneConfig
from prepare_datasets import make_synthetic_dataset
from sig_dataloader_colab import load_signature
from training_utils import Verifier, compute_writer_metrics, load_trained_model

ROOT = Path(__file__).resolve().parents[1]
# The seed's backbone (no data_init): on these corpora its best epoch is one it trained, which the resume tests need.
TINY_TRAINING = ["--image-size", "64", "--epochs", "2", "--batch-size", "16", "--lr", "4e-3", "--no-data-init"]


def finetune(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``finetune.py`` in a process of its own, with this process's torch threads (the float sums of its numbers are
    those of the same command in this process, which some tests compare them with)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    message = result.stderr.strip()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(message.splitlines()) == 1 and message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message
    return message


def assert_decision_follows_the_threshold(output: str) -> None:
    """``verify``'s last line: ``... distance D, threshold T (...): GENUINE`` exactly when ``D <= T``."""
    found = re.search(r"distance (\S+), threshold (\S+) \(.*\): (GENUINE|FORGED)", output)
    assert found, output
    distance, threshold, decision = float(found[1]), float(found[2]), found[3]
    assert (decision == "GENUINE") == (distance <= threshold), found[0]


@pytest.fixture
def in_process(capsys):
    """``finetune.main(args)`` in this process, as a ``CompletedProcess`` (exit status, stdout, stderr). With
    ``show_warnings=True`` its warnings are on its stderr first, as the command prints them, instead of pytest's."""
    def run(*args: str | Path, show_warnings: bool = False) -> subprocess.CompletedProcess:
        capsys.readouterr()
        argv = [str(arg) for arg in args]
        code, shown = main_printing_warnings(argv) if show_warnings else (finetune_cli.main(argv), "")
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, shown + captured.err)
    return run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    result = finetune("demo", "--out", out, "--writers", "4", "--samples", "4", "--canvas", "96",
                      "--val-ratio", "0.25", *TINY_TRAINING)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test EER before fine-tuning" in result.stdout and str(out.resolve()) in result.stdout
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cedar")
    make_synthetic_dataset(root, "cedar", n_writers=5, n_genuine=4, n_forged=3, seed=3, image_size=96, progress=False)
    return root


def history_of(checkpoint: Path) -> list[int]:
    return torch.load(checkpoint, weights_only=True)["history"]["epoch"]


def test_help_on_every_subcommand(capsys) -> None:
    for command in ("demo", "prepare", "train", "evaluate", "verify", "calibrate", "serve"):
        assert finetune_help(command, capsys).startswith(f"usage: finetune.py {command}")


def other_value(setting: dataclasses.Field, kind: type) -> object:
    """A valid value of ``setting`` other than its default (the same one where there is no other)."""
    default = setting.default
    choices = setting.metadata["choices"]
    if choices:
        return next((choice for choice in choices if choice != default), default)
    # init_from keeps its default: it and pretrained exclude each other, so one setting stays at its default.
    special = {"image_size": 256, "unfreeze_blocks": 2, "finetune": "last:2", "device": "cuda:1",
               "pretrained": "weights.pth", "init_from": "", "feature_dir": "features", "min_improvement": 0.05,
               "cache_dir": "cache", "clip_grad_norm": 1.0}
    if setting.name in special:
        return special[setting.name]
    return {bool: lambda: not default, int: lambda: default + 1, float: lambda: default * 2}[kind]()


def test_every_setting_has_a_flag_and_the_flags_build_the_config(capsys) -> None:
    """Each FinetuneConfig field but dataset, data_root (positionals) and ckpt_dir (--out) is a --flag of train."""
    types = FinetuneConfig.setting_types()
    flagged = [setting for setting in dataclasses.fields(FinetuneConfig)
               if setting.name not in ("dataset", "data_root", "ckpt_dir")]
    usage = finetune_help("train", capsys)
    expected = {"dataset": "bhsig", "data_root": "/data", "ckpt_dir": "/runs/x"}
    argv = ["train", "bhsig", "/data", "--out", "/runs/x"]
    for setting in flagged:
        flag = "--" + setting.name.replace("_", "-")
        assert flag in usage, flag
        value = other_value(setting, types[setting.name])
        expected[setting.name] = value
        argv += [flag if value else "--no-" + flag[2:]] if types[setting.name] is bool else [flag, str(value)]
    args = finetune_cli.build_parser().parse_args(argv)
    config = finetune_cli.config_from_args(args, dataset=args.dataset, data_root=args.data_root, ckpt_dir=args.out)
    assert config == FinetuneConfig(**expected)
    # Every setting moved from its default but mar_type (one choice) and init_from (it excludes pretrained).
    assert {name for name in expected if config.to_dict()[name] == FinetuneConfig().to_dict()[name]} == {
        "mar_type", "init_from"}
    # --per-pair is the short form of --no-fast-head-only; the demo has its own defaults.
    per_pair = finetune_cli.build_parser().parse_args(["train", "cedar", "/data", "--out", "o", "--per-pair"])
    assert per_pair.fast_head_only is False
    demo = finetune_cli.build_parser().parse_args(["demo"])
    assert (demo.image_size, demo.epochs, demo.lr) == (128, 8, 4e-3)


def finetune_help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        finetune_cli.main([command, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, in_process, tmp_path: Path) -> None:
    """An ``InputError`` (here a setting) is one line and exit 1; any other error, a ValueError raised inside a
    library included, is a bug and keeps its traceback."""
    def library_bug(args) -> None:
        np.zeros(3).reshape(2, 2)  # numpy raises ValueError: a bug of ours, not the user's input

    def bad_setting(args) -> None:
        FinetuneConfig(epochs=0)

    monkeypatch.setattr(finetune_cli, "cmd_prepare", library_bug)
    with pytest.raises(ValueError, match="reshape"):
        finetune_cli.main(["prepare", "cedar", str(tmp_path)])
    monkeypatch.setattr(finetune_cli, "cmd_prepare", bad_setting)
    assert_one_line_error(in_process("prepare", "cedar", tmp_path), "error: invalid settings: --epochs must be >= 1")
    with pytest.raises(ValueError, match="epochs must be"):  # --debug shows the traceback of any error
        finetune_cli.main(["--debug", "prepare", "cedar", str(tmp_path)])


def test_a_bad_input_in_a_real_process_is_one_line(tmp_path: Path) -> None:
    """The one real-process check of the rule: exit status 1 and a single ``error:`` line on stderr."""
    missing = tmp_path / "nowhere"
    assert_one_line_error(finetune("prepare", "cedar", missing), str(missing))


def test_abbreviated_flags_are_refused(in_process) -> None:
    with pytest.raises(SystemExit) as stopped:
        in_process("train", "cedar", "/data", "--out", "o", "--epoch", "3")
    assert stopped.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_cuda_is_one_line(corpus: Path, tmp_path: Path, in_process) -> None:
    assert_one_line_error(in_process("train", "cedar", corpus, "--out", tmp_path / "run", "--device", "cuda"),
                          "--device cuda", "no CUDA GPU")


def test_demo_writes_metrics_plots_and_weights(demo_run: Path) -> None:
    for name in ("test_before_metrics.json", "test_metrics.json", "val_metrics.json", "history.json", "history.png",
                 "test_roc.png", "test_scores.png", "best.pt", "best_weights.pth", "calibration.json",
                 "test_tippett.png", "test_ece.png"):
        assert (demo_run / name).is_file(), name
    assert history_of(demo_run / "best.pt")[0] == 0
    assert json.loads((demo_run / "history.json").read_text())["epoch"] == [0, 1, 2]


def test_evaluate_and_verify_a_run(demo_run: Path, in_process, tmp_path: Path) -> None:
    result = finetune("evaluate", "--run", demo_run, "--split", "val", "--name", "again")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((demo_run / "again_metrics.json").read_text())["eer"] == json.loads(
        (demo_run / "val_metrics.json").read_text())["eer"]

    data = demo_run / "data"
    validation = json.loads((demo_run / "val_metrics.json").read_text())
    threshold = validation["threshold"]
    scans = data / "full_org/original_1_1.png", data / "full_forg/forgeries_1_1.png"
    result = finetune("verify", *scans, "--run", demo_run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"threshold {threshold:.6g}" in result.stdout
    assert_decision_follows_the_threshold(result.stdout)
    assert re.search(r"likelihood ratio \S+ \(log10 [+-]\d\.\d\d\): .* support for the .* \(ENFSI verbal scale", result.stdout)

    # The test split at the threshold verify uses (its own EER threshold's figures stay, labelled), and the Cllr
    # figures of its likelihood ratios, which were fitted on the validation split.
    result = in_process("evaluate", "--run", demo_run)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((demo_run / "test_metrics.json").read_text())
    point = saved["operating_point"]
    assert (point["threshold"], point["n_val_pairs"]) == (threshold, validation["n_genuine"] + validation["n_forged"])
    assert point["n_val_writers"] == validation["n_writers"] == 1 and "1 writer (fewer than 5)" in point["warning"]
    assert "own EER threshold" in result.stdout and "no user can know it in advance" in saved["threshold_source"]
    assert (f"at the threshold verify uses, {threshold:.6g}" in result.stdout
            and f"FRR {100 * point['frr']:.2f} %, FAR skilled {100 * point['far_skilled']:.2f} %" in result.stdout)
    skilled = saved["evidence"]["skilled"]
    assert 0 <= skilled["cllr_min"] <= skilled["cllr"] and skilled["cllr_cal"] == pytest.approx(
        skilled["cllr"] - skilled["cllr_min"])
    assert saved["evidence"]["random"] is None  # the demo's pair files hold no random forgeries
    assert (f"Cllr {skilled['cllr']:.3f}, Cllr_min {skilled['cllr_min']:.3f}, Cllr_cal {skilled['cllr_cal']:.3f}"
            in result.stdout)
    assert (demo_run / "test_tippett.png").read_bytes()[:4] == b"\x89PNG"

    # verify --json: the likelihood ratio of the distance, its log10 and its words.
    result = in_process("verify", *scans, "--run", demo_run, "--json")
    decision = json.loads(result.stdout)
    calibration = load_calibration(demo_run)
    lr = decision["likelihood_ratio"]
    assert lr == pytest.approx(calibration.likelihood_ratios([decision["distance"]])[0], rel=1e-12)
    assert decision["log10_likelihood_ratio"] == pytest.approx(math.log10(lr), abs=1e-12)
    assert decision["verbal_equivalent"] == verbal_equivalent(lr)

    # A run trained before the calibration: no LR, and the way to add one; calibrate fits it again without training.
    (demo_run / "calibration.json").rename(tmp_path / "calibration.json")
    with pytest.warns(UserWarning, match=f"python finetune.py calibrate --run {demo_run}"):
        result = in_process("verify", *scans, "--run", demo_run, "--json")
    assert json.loads(result.stdout)["likelihood_ratio"] is None
    result = in_process("calibrate", "--run", demo_run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "in-sample, so optimistic), genuine vs skilled forgeries: Cllr" in result.stdout
    again = load_calibration(demo_run)
    assert again.fitted_on == calibration.fitted_on and again.bounds == calibration.bounds
    assert again.logistic == pytest.approx(calibration.logistic, rel=1e-6)


def test_a_16_bit_scan_verifies_like_its_8_bit_twin(demo_run: Path, tmp_path: Path, in_process) -> None:
    from PIL import Image

    twin = np.asarray(Image.open(demo_run / "data/full_org/original_1_1.png"))  # grey paper: not 0 to 255
    Image.fromarray(twin).save(tmp_path / "reference_8bit.png")
    Image.fromarray(twin.astype(np.uint16) * 257).save(tmp_path / "reference_16bit.tif")
    query = demo_run / "data/full_forg/forgeries_1_1.png"
    eight, sixteen = (in_process("verify", tmp_path / name, query, "--run", demo_run)
                      for name in ("reference_8bit.png", "reference_16bit.tif"))
    assert eight.returncode == 0 and sixteen.returncode == 0, eight.stderr[-2000:] + sixteen.stderr[-2000:]
    # The same distance and decision; only the reference's file name differs.
    assert sixteen.stdout.replace("reference_16bit.tif", "reference_8bit.png") == eight.stdout
    assert "distance" in eight.stdout


def test_prepare_train_resume_and_start_over(corpus: Path, tmp_path: Path, in_process, monkeypatch) -> None:
    # The second time (in this process) the files are checked and kept; a relative root, as people type it.
    monkeypatch.chdir(corpus.parent)
    for result in (finetune("prepare", "cedar", corpus.name, "--val-ratio", "0.2", cwd=corpus.parent),
                   in_process("prepare", "cedar", corpus.name, "--val-ratio", "0.2", show_warnings=True)):
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.count("OK") == 3 and not result.stderr
    monkeypatch.undo()
    assert all((corpus / f"gray_{split}.txt").is_file() for split in ("train", "val", "test"))

    out = tmp_path / "run"
    result = finetune("train", "cedar", corpus, "--out", out, *TINY_TRAINING)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test EER" in result.stdout and (out / "test_metrics.json").is_file()
    final_weights = torch.load(out / "epoch_0002.pt", weights_only=True)["trained_state_dict"]["head_str.weight"]

    # Stopped during epoch 2: the same command continues from epoch 1, to the same weights.
    (out / "epoch_0002.pt").unlink()
    result = in_process("train", "cedar", corpus, "--out", out, *TINY_TRAINING)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "after epoch 1" in result.stderr + result.stdout
    assert history_of(out / "epoch_0002.pt") == [0, 1, 2]
    assert torch.equal(torch.load(out / "epoch_0002.pt", weights_only=True)["trained_state_dict"]["head_str.weight"],
                       final_weights)

    result = in_process("train", "cedar", corpus, "--out", out, "--no-resume", *TINY_TRAINING)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "new run" in result.stderr + result.stdout
    (previous,) = out.glob("previous-*")  # the earlier run's checkpoints and report, with their checksums
    moved = {path.name for path in previous.iterdir()}
    assert {"best.pt", "epoch_0001.pt", "epoch_0002.pt", "best_weights.pth", "test_metrics.json", "history.json"} <= moved
    assert all(name + ".sha256" in moved for name in moved if name.endswith((".pt", ".pth")))
    assert history_of(out / "epoch_0002.pt") == [0, 1, 2]


def test_missing_folder(tmp_path: Path, in_process) -> None:
    missing = tmp_path / "nowhere"
    assert_one_line_error(in_process("train", "cedar", missing, "--out", tmp_path / "run"), str(missing), "Fix:")
    assert_one_line_error(in_process("prepare", "cedar", missing), str(missing))
    assert_one_line_error(in_process("evaluate", "--run", tmp_path), "best.pt", "Fix:")


def test_bad_pair_file(corpus: Path, tmp_path: Path, in_process) -> None:
    bad_root = tmp_path / "bad"
    shutil.copytree(corpus, bad_root)
    lines = (bad_root / "gray_train.txt").read_text().splitlines()
    lines[2] = "full_org/original_1_1.png only-two-fields"
    (bad_root / "gray_train.txt").write_text("\n".join(lines) + "\n")
    (bad_root / "gray_val.txt").write_text("full_org/original_1_1.png\tfull_org/original_1_2.png\t1\n")
    (bad_root / "gray_test.txt").write_text("full_org/original_1_1.png\tfull_org/original_1_2.png\t1\n")
    assert_one_line_error(in_process("train", "cedar", bad_root, "--out", tmp_path / "run", *TINY_TRAINING),
                          "gray_train.txt", "line 3")
    assert not (tmp_path / "run").exists(), "a run that failed at its start leaves no folder (and no .lock) behind"


def test_wrong_checkpoint(demo_run: Path, tmp_path: Path, in_process) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes((demo_run / "best.pt").read_bytes()[:5000])  # a download cut short
    assert_one_line_error(in_process("evaluate", "--run", broken), "broken.pt")

    weights_only = demo_run / "best_weights.pth"  # plain weights, not a run's checkpoint
    assert_one_line_error(in_process("verify", "a.png", "b.png", "--run", weights_only), "best_weights.pth")

    other_model = tmp_path / "other_model.pth"  # weights of some other network
    torch.save({"backbone.conv.weight": torch.zeros(3, 3)}, other_model)
    assert_one_line_error(
        in_process("train", "cedar", demo_run / "data", "--out", tmp_path / "run", "--pretrained", other_model,
                   *TINY_TRAINING),
        "other_model.pth", "missing keys",
    )


def test_bad_settings_and_missing_image(demo_run: Path, tmp_path: Path, in_process) -> None:
    assert_one_line_error(in_process("demo", "--out", tmp_path / "demo", "--image-size", "100"), "multiple of 32")
    assert_one_line_error(
        in_process("verify", tmp_path / "missing.png", demo_run / "data/full_org/original_1_1.png", "--run", demo_run),
        "missing.png",
    )


# --------------------------------------------------------------------------- GPDS and BHSig end to end

@pytest.fixture(scope="module")
def gpds_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A GPDS-layout corpus (one writer in both train/ and test/), prepared with --resplit and trained."""
    root = tmp_path_factory.mktemp("gpds")
    make_synthetic_dataset(root, "gpds", n_writers=6, n_genuine=4, n_forged=3, seed=5, image_size=64, progress=False)
    folder_split = finetune("prepare", "gpds", root)  # the folder split shares a writer between train/ and test/
    warning, error = folder_split.stderr.strip().splitlines()
    assert folder_split.returncode == 1 and error.startswith("error: ") and "--resplit" in error
    assert warning.startswith("warning: 1 writer(s) appear in both") and "--resplit" in warning
    with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(io.StringIO()) as stderr:
        code, shown = main_printing_warnings(["prepare", "gpds", str(root), "--resplit", "--test-ratio", "0.3",
                                              "--val-ratio", "0.2"])
    assert code == 0 and stdout.getvalue().count("  OK") == 3, stdout.getvalue() + shown + stderr.getvalue()
    out = root.parent / "gpds_run"
    trained = finetune("train", "gpds", root, "--out", out, *TINY_TRAINING, "--max-train-pairs-per-epoch", "30")
    assert trained.returncode == 0, trained.stderr[-3000:]
    return root, out, trained


def test_gpds_prepare_train_evaluate_verify(gpds_run, in_process) -> None:
    root, out, trained = gpds_run
    output = trained.stdout + trained.stderr
    assert "the backbone is fresh" in output and "Best model (epoch" in trained.stdout
    assert json.loads((out / "test_before_metrics.json").read_text())["n_genuine"] > 0
    assert sorted(name for name in ("val", "test") if (out / f"{name}_metrics.json").is_file()) == ["test", "val"]

    # A finished run, run again: nothing trained, nothing embedded (every feature comes from the store).
    start = time.perf_counter()
    again = finetune("train", "gpds", root, "--out", out, *TINY_TRAINING, "--max-train-pairs-per-epoch", "30")
    seconds = time.perf_counter() - start
    output = again.stdout + again.stderr
    assert again.returncode == 0, again.stderr[-2000:]
    # The store is named once a process (module/features/cache.py), and again only for a split that embeds.
    assert "nothing to train" in output and "embedding" not in output and output.count("nothing to embed") == 1
    print(f"\nre-running a finished train: {seconds:.1f} s")

    evaluated = finetune("evaluate", "--run", out)
    assert evaluated.returncode == 0 and "nothing to embed" in evaluated.stdout + evaluated.stderr, evaluated.stderr
    reference, query = sorted(root.glob("train/genuine/c-00*.jpg"))[:2]
    verified = in_process("verify", reference, query, "--run", out)
    assert verified.returncode == 0, verified.stderr
    assert_decision_follows_the_threshold(verified.stdout)


def test_bhsig_with_few_writers_prepare_train_evaluate_verify(gpds_run, tmp_path: Path, in_process) -> None:
    root = tmp_path / "Hindi"
    make_synthetic_dataset(root, "bhsig", n_writers=4, n_genuine=4, n_forged=3, seed=6, image_size=64, progress=False)
    # The default test writers (1-60) take all four: the error names the flag that fixes it.
    assert_one_line_error(in_process("prepare", "bhsig", root, show_warnings=True), "--test-writers")
    # Pair files without a validation split (--val-ratio 0): train names the command that adds one.
    made = subprocess.run([sys.executable, str(ROOT / "prepare_datasets.py"), "bhsig", str(root), "--test-writers", "1",
                           "--val-ratio", "0"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    message = assert_one_line_error(in_process("train", "bhsig", root, "--out", tmp_path / "run", *TINY_TRAINING,
                                               show_warnings=True), "gray_val.txt not found")
    fix = message.split("Fix: ")[1]
    assert fix == f"python finetune.py prepare bhsig {root} --val-ratio 0.1 --test-writers 1"
    prepared = in_process(*fix.split()[2:], show_warnings=True)
    assert prepared.returncode == 0 and prepared.stdout.count("  OK") == 3, prepared.stdout + prepared.stderr

    # A validation figure no epoch can beat by 90 %: the best model is the starting one, and train and verify say so.
    out = tmp_path / "run"
    trained = in_process("train", "bhsig", root, "--out", out, *TINY_TRAINING, "--min-improvement", "0.9",
                         show_warnings=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Best model (epoch 0)" in trained.stdout and "did not improve on the starting model" in trained.stdout
    verified = in_process("verify", root / "1/H-S-1-G-01.tif", root / "1/H-S-1-F-01.tif", "--run", out,
                          show_warnings=True)
    assert verified.returncode == 0 and "warning: fine-tuning did not improve" in verified.stderr, verified.stderr

    # The GPDS run on this BHSig folder: its pair files are read, none rewritten.
    before = {path.name: path.read_bytes() for path in root.glob("*.*")}
    _, gpds_out, _ = gpds_run
    evaluated = in_process("evaluate", "--run", gpds_out, "--dataset", "bhsig", "--data-root", root,
                           show_warnings=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert {path.name: path.read_bytes() for path in root.glob("*.*")} == before
    assert json.loads((gpds_out / "bhsig_test_metrics.json").read_text())["n_genuine"] == 6
@pytest.fixture(scope="module")
def bank_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 writers (2 of them test writers) of 5 genuine signatures and 3 forgeries; 2 random forgeries a test writer."""
    root = tmp_path_factory.mktemp("bank")
    make_synthetic_dataset(root, "cedar", n_writers=8, n_genuine=5, n_forged=3, seed=4, image_size=96, progress=False)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = finetune_cli.main(["prepare", "cedar", str(root), "--val-ratio", "0.25", "--random-forgeries", "2"])
    assert code == 0, stdout.getvalue()[-2000:]
    kinds = Counter(pair_kind(ref, query) for ref, query, _ in read_pair_file(root / "gray_test.txt").pairs)
    assert kinds == {"genuine": 2 * 10, "skilled": 2 * 15, "random": 2 * 2}
    assert "random" not in {pair_kind(ref, query) for ref, query, _ in read_pair_file(root / "gray_train.txt").pairs}
    return root


def test_verify_three_references_json_and_explain(demo_run: Path, tmp_path: Path, capsys) -> None:
    data = demo_run / "data"
    references = [data / f"full_org/original_1_{n}.png" for n in (1, 2, 3)]
    query = data / "full_forg/forgeries_1_1.png"
    figure = tmp_path / "why.png"
    result = finetune("verify", *references, query, "--run", demo_run, "--json", "--explain", figure)
    assert result.returncode == 0, result.stderr[-2000:]
    decision = json.loads(result.stdout)  # one JSON object and nothing else
    assert list(decision)[:4] == ["distances", "distance", "threshold", "genuine"] and len(decision["distances"]) == 3
    assert set(decision) == {"distances", "distance", "threshold", "genuine", "likelihood_ratio",
                             "log10_likelihood_ratio", "verbal_equivalent"}
    assert decision["distance"] == pytest.approx(sum(decision["distances"]) / 3, rel=1e-12)
    assert decision["threshold"] == json.loads((demo_run / "val_metrics.json").read_text())["threshold"]
    assert decision["genuine"] == (decision["distance"] <= decision["threshold"])
    assert figure.read_bytes()[:4] == b"\x89PNG"

    # The Verifier of the run gives the command's numbers; each distance is that reference's alone.
    verifier = Verifier.from_run(demo_run)
    assert verifier.verify(query, references=references).distances == pytest.approx(decision["distances"], rel=1e-6)
    alone = verifier.verify(query, references=references[1:2]).distance
    assert alone == pytest.approx(decision["distances"][1], rel=1e-6)

    assert finetune_cli.main(["verify", *map(str, references), str(query), "--run", str(demo_run),
                              "--aggregate", "max", "--threshold", "0.5"]) == 0
    output = capsys.readouterr().out
    assert all(f"{reference}: distance" in output for reference in references)
    assert f"max distance {max(decision['distances']):.6g}, threshold 0.5 (--threshold 0.5): " in output
    assert finetune_cli.main(["verify", str(query), "--run", str(demo_run)]) == 1
    assert "at least one REF" in capsys.readouterr().err


def test_evaluate_writer_level_and_with_references(demo_run: Path, bank_corpus: Path, in_process) -> None:
    result = in_process("evaluate", "--run", demo_run, "--data-root", bank_corpus, "--name", "bank")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "writer level (2 writers)" in result.stdout
    writers = json.loads((demo_run / "bank_metrics.json").read_text())["writer_level"]
    assert [record["n_random"] for record in writers["per_writer"]] == [2, 2] and writers["far_random"] is not None
    rows = (demo_run / "bank_per_writer.csv").read_text().splitlines()
    assert rows[0] == "writer,eer,threshold,auc,n_genuine,n_skilled,n_random" and len(rows) == 3
    assert rows[1].split(",")[0] == str(writers["per_writer"][0]["writer"]) and rows[1].endswith(",10,15,2")
    assert (demo_run / "bank_writer_eers.png").is_file()

    result = in_process("evaluate", "--run", demo_run, "--data-root", bank_corpus, "--name", "bank", "--references", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((demo_run / "bank_references_3_metrics.json").read_text())
    assert (saved["references"], saved["aggregate"], saved["writers_left_out"]) == (3, "mean", [])
    assert "queries against 3 references each" in result.stdout and "FAR random" in result.stdout

    # The same protocol by hand: each image embedded alone, each trial's mean distance, the writer-level figures.
    config, model = load_trained_model(demo_run)
    pairs = [(str(bank_corpus / ref), str(bank_corpus / query)) for ref, query, _ in
             read_pair_file(bank_corpus / "gray_test.txt").pairs]
    trials, _ = reference_trials(pairs, 3, np.random.default_rng(config.seed))
    assert saved["n_trials"] == len(trials) == 2 * (5 + 3) + len({(ref, query) for ref, query in pairs
                                                                   if pair_kind(ref, query) == "random"})
    with torch.no_grad():
        features = {path: model.embed(load_signature(path, config.image_size)[None])
                    for path in {path for refs, query, _, _ in trials for path in (*refs, query)}}
        distances = [np.mean([model.compare(features[ref], features[query]).item() for ref in refs])
                     for refs, query, _, _ in trials]
    expected = compute_writer_metrics(distances, [writer for *_, writer, _ in trials], [kind for *_, kind in trials])
    for key in ("eer", "frr", "far_skilled", "far_random", "eer_user_thresholds", "mean_writer_auc"):
        assert saved[key] == pytest.approx(expected[key], abs=1e-12), key
    assert saved["threshold"] == pytest.approx(expected["threshold"], rel=1e-5)


# --------------------------------------------------------------------------- bad input as a new user gives it

def test_bad_inputs_each_get_one_line_naming_the_flag_or_file(demo_run: Path, tmp_path: Path, in_process) -> None:
    data = demo_run / "data"
    reference, query = data / "full_org/original_1_1.png", data / "full_forg/forgeries_1_1.png"
    # Non-finite or negative thresholds and learning rates are settings errors, refused before any work.
    for value in ("nan", "-5"):
        assert_one_line_error(in_process("verify", reference, query, "--run", demo_run, "--threshold", value),
                              f"--threshold {float(value)}", "finite number >= 0")
    assert_one_line_error(in_process("train", "cedar", data, "--out", tmp_path / "lr", "--lr", "nan"),
                          "--lr must be a finite number > 0")
    assert not (tmp_path / "lr").exists(), "a refused start leaves no run folder behind"
    # A warm-up as long as the run names both settings.
    assert_one_line_error(in_process("train", "cedar", data, "--out", tmp_path / "w", "--epochs", "1"),
                          "--warmup-epochs must be in [0, --epochs=1)")
    # A run folder that cannot be written.
    assert_one_line_error(in_process("train", "cedar", data, "--out", "/proc/run"), "--out /proc/run", "Fix:")
    # A pickle with code in it is refused as such, not as a damaged file.
    class Payload:
        def __reduce__(self):
            return (print, ("this would have run",))
    torch.save({"model": Payload()}, tmp_path / "unsafe.pth")
    assert_one_line_error(in_process("train", "cedar", data, "--out", tmp_path / "u", "--pretrained",
                                     tmp_path / "unsafe.pth"), "pickled Python objects", "would run code")
    # A huge image: too large for a scan, not a "decompression bomb" to re-download.
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(30000, 30000))  # PIL refuses it from its header, before any pixel
    message = assert_one_line_error(in_process("verify", reference, huge, "--run", demo_run), "huge.png",
                                    "too large for a scan")
    assert "re-download" not in message and "DOS" not in message
    # Another layout's pairs: CEDAR scans read as BHSig are refused with the dataset to give.
    assert_one_line_error(in_process("evaluate", "--run", demo_run, "--dataset", "bhsig", "--data-root", data),
                          "names cedar scans", "--dataset cedar")


def png_header(width: int, height: int) -> bytes:
    """A PNG file of an 8-bit grayscale image of that size whose pixel data is missing: its header alone says how
    large it is (a few bytes instead of ``width * height``)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_one_writer_states_the_minimum(tmp_path: Path, in_process) -> None:
    make_synthetic_dataset(tmp_path, "cedar", n_writers=1, n_genuine=3, n_forged=2, image_size=64, progress=False)
    assert_one_line_error(in_process("prepare", "cedar", tmp_path), "1 usable writer(s)", "at least 3 writers")


def test_a_truncated_scan_is_found_by_prepare(corpus: Path, tmp_path: Path, in_process) -> None:
    root = tmp_path / "cut"
    shutil.copytree(corpus, root)
    scan = root / "full_org/original_2_1.png"
    scan.write_bytes(scan.read_bytes()[:100])  # the header decodes, the pixels do not
    result = in_process("prepare", "cedar", root)
    assert result.returncode == 1 and "original_2_1.png" in result.stdout and "not a readable image" in result.stdout


def test_sigterm_ends_a_run_with_the_ctrl_c_message_and_status_143(demo_run: Path, tmp_path: Path) -> None:
    import signal

    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), "train", "cedar", str(demo_run / "data"), "--out",
                                str(out), *TINY_TRAINING, "--epochs", "50"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # Any finished epoch: on these sizes an epoch takes ~0.1 s, and epoch 1's file is pruned two epochs later.
    while not [path for path in out.glob("epoch_*.pt") if path.stem != "epoch_0000"] and time.time() < deadline \
            and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM): finished epochs are saved; run the same command again" in stderr
    assert "a re-run continues after epoch" in stdout  # the run's log, which names the epoch on disk
