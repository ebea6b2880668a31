"""training.ipynb executed for real (papermill, a fresh kernel each time) in DEMO mode with tiny settings.

One run, then the two ways a Colab session is lost, each followed by "Run
all" in a fresh kernel: a runtime restart (files on disk kept) and a
disconnect (the local disk, here the demo corpus, gone; the checkpoints on
Drive kept). Because resume is exact, the resumed runs must end with the
very weights of the uninterrupted one, and the history must list every epoch
once.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import papermill
import pytest
import torch

from prepare_datasets import ensure_pair_files, make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "training.ipynb"
EPOCHS = 3
PART_TITLES = [
    "Setup and downloads", "Pair files", "Imports", "Data", "Model", "Resume",
    "Training", "Evaluation on the test split", "Cross-dataset evaluation", "Plots and exports",
]


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernel spec running this interpreter, first on JUPYTER_PATH: no `ipykernel install` needed in a fresh venv."""
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_path))
        yield "python3"


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def stream_text(notebook: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in code_cells(notebook) for out in cell.get("outputs", []))


def tiny_parameters(work: Path) -> dict:
    return {
        "CKPT_DIR": str(work / "ckpt"),
        "DOWNLOAD_DIR": str(work / "downloads"),
        "DATA_ROOT": str(work / "demo"),
        "DEMO_CORPUS": {"n_writers": 4, "n_genuine": 4, "n_forged": 3, "image_size": 96},
        # keep_last=EPOCHS keeps every epoch's checkpoint, so a disconnect can be simulated at any epoch.
        "DEMO_SETTINGS": {"image_size": 64, "epochs": EPOCHS, "lr": 4e-3, "batch_size": 16, "keep_last": EPOCHS,
                          "val_ratio": 0.25},
        "NUM_WORKERS": 0,
    }


def execute(source: Path, output: Path, parameters: dict, kernel_name: str) -> nbformat.NotebookNode:
    papermill.execute_notebook(
        str(source), str(output), parameters=parameters, kernel_name=kernel_name, cwd=str(ROOT), progress_bar=False,
    )
    return nbformat.read(output, as_version=4)


def saved_run(ckpt_dir: Path, epoch: int) -> tuple[list[int], torch.Tensor]:
    checkpoint = torch.load(ckpt_dir / f"epoch_{epoch:04d}.pt", weights_only=True)
    return checkpoint["history"]["epoch"], checkpoint["trained_state_dict"]["head_str.weight"]


def test_committed_notebook_is_the_generator_output() -> None:
    result = subprocess.run([sys.executable, "tools/make_notebook.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_parameters_cell_first_then_the_ten_parts() -> None:
    cells = code_cells(nbformat.read(NOTEBOOK, as_version=4))
    assert cells[0].metadata.get("tags") == ["parameters"]
    names: dict = {}
    exec(cells[0].source, names)  # plain assignments only
    for name in ("DATASET", "DATA_ROOT", "PRETRAINED", "GDRIVE_IDS", "CKPT_DIR", "EPOCHS", "BATCH_SIZE", "LR",
                 "WARMUP_EPOCHS", "PATIENCE", "FAST_HEAD_ONLY", "IMAGE_SIZE", "SEED", "DEMO", "AMP", "AMP_DTYPE", "NUM_WORKERS",
                 "FEATURE_DTYPE", "FEATURE_DIR", "UNFREEZE_BLOCKS"):
        assert name in names, name
    from training_utils import FinetuneConfig

    settings = FinetuneConfig.from_parameters(names, dataset="cedar").to_dict()  # the demo's dataset
    assert all(settings[name.lower()] == value for name, value in names.items()
               if name.lower() in settings and name != "DATASET"), "an upper-case setting did not reach the config"
    assert names["DATASET"] == "" and names["DEMO"] is None, "the demo must be the default"
    assert [cell.source.splitlines()[0].split(" - ")[0] for cell in cells[1:]] == [f"# PART {n}" for n in range(1, 11)]
    markdown = [cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "markdown"]
    assert [f"## PART {n}: {title}" for n, title in enumerate(PART_TITLES, start=1)] == markdown[1:]


def test_the_repository_url_is_the_readmes_and_the_badge_opens_this_notebook() -> None:
    spec = importlib.util.spec_from_file_location("make_notebook", ROOT / "tools" / "make_notebook.py")
    make_notebook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_notebook)
    url = make_notebook.repository_url()
    names: dict = {}
    exec(code_cells(nbformat.read(NOTEBOOK, as_version=4))[0].source, names)
    assert names["REPO_URL"] == url and names["PROJECT_DIR"] == ""
    owner_and_name = url.removeprefix("https://github.com/")
    readme = make_notebook.README.read_text()
    assert f"(https://colab.research.google.com/github/{owner_and_name}/blob/main/training.ipynb)" in readme
    assert f"git clone {url} " in readme  # the first step clones what the notebook clones


def test_the_demo_asks_for_no_drive_and_a_real_run_keeps_its_checkpoints_on_drive(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import downloads

    mounted: list[bool] = []
    my_drive = tmp_path / "drive" / "MyDrive"

    def mount_drive() -> Path:
        mounted.append(True)
        return my_drive

    monkeypatch.setattr(downloads, "in_colab", lambda: True)
    monkeypatch.setattr(downloads, "mount_drive", mount_drive)
    demo = downloads.resolve_notebook_setup("", "", "", None, "", 0.1, {"val_ratio": 0.2})
    assert not mounted and demo.ckpt_dir == Path.cwd() / "checkpoints/demo"
    assert demo.download_dir == Path.cwd() / "data/downloads"

    kept = downloads.resolve_notebook_setup("", "", "/content/drive/MyDrive/demo", None)  # a demo kept on Drive
    assert mounted and kept.ckpt_dir == Path("/content/drive/MyDrive/demo")

    mounted.clear()
    real = downloads.resolve_notebook_setup("cedar", "data/CEDAR", "", None)
    assert mounted and real.ckpt_dir == my_drive / "detailsemnet/checkpoints/cedar"
    assert real.download_dir == my_drive / "detailsemnet/downloads"


def test_the_command_line_trains_through_the_notebooks_pipeline_function(tmp_path: Path, monkeypatch) -> None:
    """``finetune.py train`` calls ``train_and_report`` with the config its flags make (the notebook's PART 7 does
    too: the demo run below finds ``test_before_metrics.json``, which only ``train_and_report`` writes)."""
    import finetune
    import training_utils

    class Called(Exception):
        pass

    def pipeline(config, **options):
        raise Called(config, options)

    monkeypatch.setattr(training_utils, "train_and_report", pipeline)
    (tmp_path / "data").mkdir()
    with pytest.raises(Called) as called:
        finetune.main(["train", "bhsig", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "3"])
    config, options = called.value.args
    assert (config.dataset, config.epochs, config.ckpt_dir) == ("bhsig", 3, str(tmp_path / "run"))
    assert options == {"resume": True}


def test_demo_defaults_match_the_command_line_demo() -> None:
    import finetune

    names: dict = {}
    exec(code_cells(nbformat.read(NOTEBOOK, as_version=4))[0].source, names)
    demo = vars(finetune.build_parser().parse_args(["demo"]))  # the demo's defaults
    defaults = {key: demo[key] for key in names["DEMO_SETTINGS"]}  # image_size, epochs, lr, val_ratio
    assert defaults == names["DEMO_SETTINGS"]
    corpus = names["DEMO_CORPUS"]
    assert (corpus["n_writers"], corpus["n_genuine"], corpus["image_size"]) == (demo["writers"], demo["samples"],
                                                                                demo["canvas"])


def test_demo_runs_and_resumes_after_restart_and_after_run_all(tmp_path: Path, kernel_name: str) -> None:
    parameters = tiny_parameters(tmp_path)
    ckpt_dir = tmp_path / "ckpt"

    # 1. The whole notebook, uninterrupted, with two other corpora for the cross-dataset part: one without pair
    # files (PART 9 writes gray_test.txt there, and nothing else), one whose pair files must stay byte for byte.
    other, prepared = tmp_path / "other", tmp_path / "prepared"
    make_synthetic_dataset(other, "cedar", n_writers=4, n_genuine=3, n_forged=2, seed=7, image_size=96, progress=False)
    make_synthetic_dataset(prepared, "cedar", n_writers=4, n_genuine=3, n_forged=2, seed=8, image_size=96, progress=False)
    ensure_pair_files("cedar", prepared, val_ratio=0.25, random_state=3)
    prepared_files = {path.name: path.read_bytes() for path in prepared.iterdir() if path.is_file()}
    cross = [["cedar", str(other)], ["cedar", str(prepared)]]
    first = execute(NOTEBOOK, tmp_path / "first.ipynb", {**parameters, "CROSS_DATASETS": cross}, kernel_name)
    assert "new run" in stream_text(first)
    assert {path.name: path.read_bytes() for path in prepared.iterdir() if path.is_file()} == prepared_files
    assert sorted(path.name for path in other.glob("*.txt")) == ["gray_test.txt"]
    assert json.loads((ckpt_dir / "cross_cedar_prepared_metrics.json").read_text())["n_genuine"] == 3
    history, final_head = saved_run(ckpt_dir, EPOCHS)
    assert history == list(range(EPOCHS + 1))  # epoch 0 is the model before fine-tuning
    for name in ("test_metrics.json", "val_metrics.json", "history.json", "history.png", "test_roc.png", "best_weights.pth",
                 "test_before_metrics.json"):
        assert (ckpt_dir / name).is_file(), name
    assert "the backbone is fresh" in stream_text(first)
    assert json.loads((ckpt_dir / "cross_cedar_other_metrics.json").read_text())["n_genuine"] > 0
    assert json.loads((ckpt_dir / "test_metrics.json").read_text())["writer_level"]["per_writer"]
    for mistake in ("false accept", "false reject"):  # PART 8 explains each, or says there is none
        drawn = (ckpt_dir / f"test_worst_{mistake.replace(' ', '_')}.png").is_file()
        assert drawn != (f"no {mistake} on the test split" in stream_text(first)), mistake
    assert json.loads((ckpt_dir / "history.json").read_text())["epoch"] == history

    # 2. A runtime restart during the last epoch (files kept), then Run all: nothing is remade, training continues.
    (ckpt_dir / f"epoch_{EPOCHS:04d}.pt").unlink()
    (ckpt_dir / "test_metrics.json").unlink()
    kept_files = sorted((tmp_path / "demo").glob("*.txt")) + sorted((tmp_path / "demo" / "full_org").iterdir())
    times_before = [path.stat().st_mtime_ns for path in kept_files]
    restarted = execute(NOTEBOOK, tmp_path / "restarted.ipynb", parameters, kernel_name)
    output = stream_text(restarted)
    assert f"epoch_{EPOCHS - 1:04d}.pt after epoch {EPOCHS - 1}" in output and "(reused)" in output
    assert [path.stat().st_mtime_ns for path in kept_files] == times_before, "corpus or pair files were rewritten"
    history, head = saved_run(ckpt_dir, EPOCHS)
    assert history == list(range(EPOCHS + 1)), "an epoch was repeated or skipped"
    assert torch.equal(head, final_head), "the resumed run must end where the uninterrupted one did"
    assert (ckpt_dir / "test_metrics.json").is_file(), "PARTs 8-10 ran after the restart"

    # 3. A disconnect after epoch 1: the local disk (the demo corpus) is gone, Drive (the checkpoints) is kept.
    for epoch in range(2, EPOCHS + 1):
        (ckpt_dir / f"epoch_{epoch:04d}.pt").unlink()
    shutil.rmtree(tmp_path / "demo")
    run_all = execute(NOTEBOOK, tmp_path / "run_all.ipynb", parameters, kernel_name)
    output = stream_text(run_all)
    assert "epoch_0001.pt after epoch 1" in output and "(new)" in output
    history, head = saved_run(ckpt_dir, EPOCHS)
    assert history == list(range(EPOCHS + 1))
    assert torch.equal(head, final_head)
