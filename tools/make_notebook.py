"""Write training.ipynb from the cell sources below (python tools/make_notebook.py [--check]).

The notebook is generated so that its cells stay reviewable as plain text and
its JSON stays stable: fixed cell ids, no outputs. --check exits 1 when the
committed notebook differs from what this script writes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "training.ipynb"
README = ROOT / "README.md"
# The project's git URL is written once, at the top of the README; the notebook's REPO_URL default is copied from it.
REPOSITORY_LINE = re.compile(r"^Repository: (\S+)$", re.MULTILINE)


def repository_url(readme: Path = README) -> str:
    """The URL on the README's ``Repository:`` line."""
    found = REPOSITORY_LINE.search(readme.read_text())
    if found is None:
        raise SystemExit(f"{readme} has no 'Repository: URL' line: the notebook's REPO_URL is taken from it")
    return found.group(1)


INTRO = """\
# Fine-tuning DetailSemNet for offline signature verification

Head-only fine-tuning of DetailSemNet (ECCV 2024): the backbone stays frozen, `head_str` learns.

**The demo first:** Runtime > Run all, nothing to set. With `DATASET = ""` the notebook clones the project,
makes a synthetic signature corpus and fine-tunes on it; its files stay on this runtime's disk, so it asks
for no Google Drive access (the README's "Demo time" gives the time measured on 2 CPU cores).

**Your own data:** Runtime > Change runtime type > GPU; in the parameters cell set `DATASET`, `DATA_ROOT`
(the folder of the layout, e.g. the one holding `full_org/` for CEDAR), `GDRIVE_IDS` (your archive on Drive)
and, if you have them, `PRETRAINED` weights; Runtime > Run all. Checkpoints go to Google Drive, which asks
for access once. The README's "Datasets" section says where each dataset comes from and which folder to
give.

**After a disconnect or a runtime restart:** Runtime > Run all. Downloads, extracted archives and pair
files are kept, and training continues from the last finished epoch on Google Drive. Stopping PART 7
and running it again also continues from the last finished epoch."""

PARAMETERS = """\
# Parameters (papermill can set any of them). DATASET = "" runs the demo on a synthetic corpus.
DATASET: str = ""               # cedar, gpds or bhsig (empty: the demo)
DATA_ROOT: str = ""             # the folder of the layout: CEDAR's holds full_org/ and full_forg/, a BHSig language folder
                                # one folder a writer, GPDS's train/ and test/; an archive unpacks into EXTRACT_DIR, so
                                # e.g. "data/CEDAR" for a CEDAR.zip holding CEDAR/full_org/ (PART 1 lists what it holds)
PRETRAINED: str = ""            # DetailSemNet weights: a .pth path, a Google Drive file id or link (empty: a fresh backbone)
GDRIVE_IDS: dict = {}           # downloaded first: {"CEDAR.zip": "<Drive file id>"} or {"CEDAR.zip": {"id": "...", "md5": "..."}}
EXTRACT_DIR: str = "data"       # archives from GDRIVE_IDS are extracted here (local disk: fast to read)
PREPARE_OPTIONS: dict = {}      # the layout's pair-file options: gpds {"resplit": True, "test_ratio": 0.2,
                                # "max_train_pairs": 200000}, bhsig {"test_writers": [1, 2]}, cedar {"train_ratio": 0.8}
CKPT_DIR: str = ""              # checkpoints, metrics and plots; "": Google Drive in Colab (survives a disconnect), but
                                # checkpoints/demo on this runtime's disk for the demo (no Drive access asked)
RESUME: bool = True             # False: start over (CKPT_DIR's earlier checkpoints move to previous-<date>/); then set it back
EPOCHS: int = 10
BATCH_SIZE: int = 32
LR: float = 4e-4                # peak learning rate of head_str (the warm-up climbs to it)
WARMUP_EPOCHS: int = 1
PATIENCE: int = 5               # stop after this many epochs without a better validation EER
FAST_HEAD_ONLY: bool = True     # True: each image through the backbone once, then only head_str trains (fast, no augmentation)
                                # False: every pair through the backbone every epoch, with augmentation (slow)
FINETUNE: str = "head"          # what trains: "head" (head_str), "last:3" (also stage 4's 3 blocks: on stored features
                                # with FAST_HEAD_ONLY), "all" (every parameter; FAST_HEAD_ONLY = False). README: No checkpoint?
UNFREEZE_BLOCKS: int = 0        # N: the same as FINETUNE = "last:N" (for notebooks written before FINETUNE)
INIT_FROM: str = ""             # start from another checkpoint's matching tensors (an ImageNet backbone), the rest fresh
DATA_INIT: bool = True          # a fresh backbone takes its BatchNorm statistics and distance scale from training scans
IMAGE_SIZE: int = 224           # model input side, a multiple of 32
AMP: bool = True                # autocast for the backbone on a GPU (ignored on a CPU); the EMD runs outside it
AMP_DTYPE: str = "float16"      # float16 (with a gradient scaler; every GPU) or bfloat16 (no scaler; A100, L4, H100)
NUM_WORKERS: int = 2            # image-loading processes
MAX_TRAIN_PAIRS_PER_EPOCH: int = 0  # each epoch a fresh sample of at most this many training pairs (0: all; GPDS: e.g. 200000)
FEATURE_DTYPE: str = "auto"     # stored backbone features: auto (float16 when float32 would crowd the RAM), float32, float16
FEATURE_DIR: str = ""           # feature store: "" = features/ in CKPT_DIR (on Drive, survives a disconnect); a local
                                # folder such as "/content/features" reads faster but is embedded again after a disconnect
CACHE_DIR: str = ""             # preprocessed images (e.g. "/content/cache"): saves the preprocessing when images are read again
SEED: int = 42
VAL_RATIO: float = 0.1          # share of writers held out for validation (it picks the best epoch)
CROSS_DATASETS: list = []       # PART 9: other datasets to test on, e.g. [("bhsig", "data/BHSig260/Hindi")]
SHOW_PAGE: bool = False         # PART 8: the verification page, inline (Gradio; the scans stay on this runtime)
DEMO: bool | None = None        # None: the demo when DATASET is ""
# The demo's synthetic corpus, and the settings that replace those above in the demo (sized for a CPU):
DEMO_CORPUS: dict = {"n_writers": 12, "n_genuine": 12, "n_forged": 12, "image_size": 256}
DEMO_SETTINGS: dict = {"image_size": 128, "epochs": 8, "lr": 4e-3, "val_ratio": 0.2}
DOWNLOAD_DIR: str = ""          # "": Google Drive in Colab (the demo: data/downloads), else data/downloads
PROJECT_DIR: str = ""           # this project's folder; "": this folder when it holds the project, else detailsemnet/
REPO_URL: str = "{repository_url}"  # cloned into PROJECT_DIR when it does not hold the project (Colab)"""

PARTS = [
    ("Setup and downloads", """\
# PART 1 - Setup and downloads. Safe to rerun: whatever is already there is skipped.
import os
project_dir = PROJECT_DIR or ("." if os.path.isfile("downloads.py") else "detailsemnet")
if not os.path.isfile(os.path.join(project_dir, "downloads.py")):  # Colab opened this notebook on its own
    !git clone -q --depth 1 {REPO_URL} {project_dir}
    if not os.path.isfile(os.path.join(project_dir, "downloads.py")):
        raise FileNotFoundError(f"{os.path.abspath(project_dir)} does not hold this project and cloning {REPO_URL} "
                                "failed. Fix: set REPO_URL to the project's git URL (the Repository line at the top "
                                "of its README), or PROJECT_DIR to a folder that holds the project.")
os.chdir(project_dir)
from module.core.threads import passive_threads
passive_threads()  # idle PyTorch threads sleep instead of spinning (before torch loads; module/core/threads.py)
from module.core.wording import use_interface
use_interface("notebook")  # messages name this notebook's parameters (RESUME = False, CKPT_DIR)
import downloads
if downloads.missing_requirements("requirements.txt"):
    %pip install -q -r requirements.txt
import prepare_datasets
setup = downloads.resolve_notebook_setup(DATASET, DATA_ROOT, CKPT_DIR, DEMO, DOWNLOAD_DIR, VAL_RATIO,
                                         DEMO_SETTINGS)  # mounts Drive in Colab
downloads.fetch_all(GDRIVE_IDS, setup.download_dir, extract_to=EXTRACT_DIR)
pretrained_path = downloads.resolve_pretrained(PRETRAINED, setup.download_dir)
if setup.demo:
    corpus = prepare_datasets.ensure_synthetic_dataset(setup.data_root, layout="cedar", seed=SEED, **DEMO_CORPUS)
    print(f"demo corpus: {corpus['counts']['files']} scans in {setup.data_root} ({'reused' if corpus['reused'] else 'new'})")
elif os.path.isdir(EXTRACT_DIR):  # where the archives went: DATA_ROOT is one of these folders, or one below
    print(f"{EXTRACT_DIR}/ holds: {', '.join(sorted(os.listdir(EXTRACT_DIR))) or 'nothing'}")
print(setup)"""),
    ("Pair files", """\
# PART 2 - Pair files: written once, then reused while they stay valid.
# Anything odd in the folders (a writer without forgeries, a writer number spelled two ways) is reported as a warning.
pair_files = prepare_datasets.ensure_pair_files(setup.dataset, setup.data_root, val_ratio=setup.val_ratio, random_state=SEED,
                                                **({} if setup.demo else PREPARE_OPTIONS))
print(pair_files)"""),
    ("Imports", """\
# PART 3 - Imports
import dataclasses
import torch
from IPython.display import Image, display
from training_utils import (FinetuneConfig, build_datasets, build_model, evaluate_and_report, evidence_summary,
                            explain_worst_errors, print_trainable_params, run_status, setup_head_only_finetune,
                            starting_model_note, train_and_report)
print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'the CPU'}")"""),
    ("Data", """\
# PART 4 - Data: the run's settings and its pair datasets (images are read lazily; a missing file or a bad line
# stops here).
config = FinetuneConfig.from_parameters(globals(), pretrained=str(pretrained_path or ""), **setup.config_overrides())
datasets = build_datasets(config)
print("\\n".join(f"{split:5s} {dataset}" for split, dataset in datasets.items()))"""),
    ("Model", """\
# PART 5 - Model: the pretrained weights (a fresh backbone takes its BatchNorm statistics and distance scale from
# training scans), and what trains (head_str; the backbone stays frozen).
model = build_model(config, training_set=datasets["train"])
trainable = print_trainable_params(setup_head_only_finetune(model))"""),
    ("Resume", """\
# PART 6 - Resume: what the checkpoint folder holds. PART 7 continues from its newest valid checkpoint.
print(run_status(config.ckpt_dir))"""),
    ("Training", """\
# PART 7 - Training, then the best epoch on the validation and test splits; best_weights.pth is exported.
# One checkpoint an epoch: stopping this cell (or a disconnect) loses at most the current epoch, and running it
# again continues from the last checkpoint on disk, not from the half-trained model in memory.
if downloads.in_colab():  # TensorBoard's curves, one point an epoch as they come (other runs stay headless)
    %load_ext tensorboard
    %tensorboard --logdir "{config.ckpt_dir}/tensorboard"
result = train_and_report(config, model=model, datasets=datasets, resume=RESUME)"""),
    ("Evaluation on the test split", """\
# PART 8 - The best model on the test split: the paper-style figures at the test split's own EER threshold, then
# FRR and FAR at the validation EER threshold (what `finetune.py verify` and the Verifier use) and the likelihood
# ratios' Cllr (calibration.json, fitted on the validation split), its Tippett and ECE plots, its writer-level
# figures, and why it made its worst mistakes: the transport plan of the worst false accept and reject.
test, threshold = result.metrics["test"], result.metrics["val"]["threshold"]
print(f"best epoch {result.run.best_epoch}: test EER {test['eer']:.2%}, accuracy {test['accuracy']:.2%}, "
      f"AUC {test['auc']:.4f} (at the test split's own EER threshold {test['threshold']:.4g}, as papers report)")
print("\\n".join(evidence_summary(test)))
for plot in ("test_tippett.png", "test_ece.png"):
    display(Image(filename=str(result.run.ckpt_dir / plot)))
if note := starting_model_note(result.run.ckpt_dir):  # best epoch 0, or a fresh backbone
    print(f"Note: {note}.")
writers = test["writer_level"]
if writers is not None:
    print(f"writer level: EER {writers['eer']:.2%} (genuine vs skilled), {writers['eer_user_thresholds']:.2%} with each "
          f"writer's own threshold, mean writer AUC {writers['mean_writer_auc']:.4f} (test_per_writer.csv)")
display(Image(filename=str(result.run.ckpt_dir / "test_scores.png")))
for mistake, figure in explain_worst_errors(result.model, datasets["test"], test, threshold, result.run.ckpt_dir).items():
    if figure is None:
        print(f"no {mistake} on the test split")
    else:
        display(Image(filename=str(figure)))
if SHOW_PAGE:  # the verification page, inline; share=False: the scans (biometric data) never leave this runtime
    import importlib.util
    if importlib.util.find_spec("gradio") is None:  # pyproject.toml's app extra
        %pip install -q -e ".[app]"
    from training_utils import Verifier
    Verifier.from_run(result.run.ckpt_dir).page().launch(share=False, inline=True, server_name="127.0.0.1")"""),
    ("Cross-dataset evaluation", """\
# PART 9 - Cross-dataset evaluation: the best model on the test split of each of CROSS_DATASETS.
# A dataset's gray_test.txt is read as it is (its pair files are never rewritten); one is written only where none exists.
for other_dataset, other_root in CROSS_DATASETS:
    prepare_datasets.ensure_test_pair_file(other_dataset, other_root, random_state=SEED)
    other_config = dataclasses.replace(result.run.config, dataset=other_dataset, data_root=str(other_root))
    other = evaluate_and_report(result.model, build_datasets(other_config, splits=("test",))["test"], result.run.ckpt_dir,
                                f"cross_{other_dataset}_{os.path.basename(os.path.normpath(other_root))}", other_config)
    print(f"{other_dataset} at {other_root}: EER {other['eer']:.2%}, AUC {other['auc']:.4f}")
print(f"{len(CROSS_DATASETS)} other datasets evaluated")"""),
    ("Plots and exports", """\
# PART 10 - Plots and exports: training curves and ROC; the run folder's files.
display(Image(filename=str(result.run.ckpt_dir / "history.png")))
display(Image(filename=str(result.run.ckpt_dir / "test_roc.png")))
print(f"In {result.run.ckpt_dir}: best_weights.pth (model_v3.load_pretrained reads it), best.pt, history.json, "
      "*_metrics.json, *.png")"""),
]


def build_notebook() -> nbformat.NotebookNode:
    parameters = PARAMETERS.replace("{repository_url}", repository_url())
    cells = [
        nbformat.v4.new_markdown_cell(INTRO, id="intro"),
        nbformat.v4.new_code_cell(parameters, id="parameters", metadata={"tags": ["parameters"]}),
    ]
    for number, (title, source) in enumerate(PARTS, start=1):
        cells.append(nbformat.v4.new_markdown_cell(f"## PART {number}: {title}", id=f"part-{number}-title"))
        cells.append(nbformat.v4.new_code_cell(source, id=f"part-{number}"))
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",  # Colab opens it on a GPU runtime
        "colab": {"provenance": []},
    }
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when training.ipynb is not this script's output")
    args = parser.parse_args(argv)
    text = nbformat.writes(build_notebook()) + "\n"
    if args.check:
        if NOTEBOOK.read_text() != text:
            print(f"{NOTEBOOK} is out of date: run python tools/make_notebook.py", file=sys.stderr)
            return 1
        return 0
    NOTEBOOK.write_text(text)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
