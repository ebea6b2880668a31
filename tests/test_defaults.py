"""One default for each option, whichever interface sets it: prepare_datasets.py, finetune.py and the notebook."""
from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
import pytest

import finetune
import prepare_datasets
from module.data.datasets import DATASETS
from training_utils import FinetuneConfig

NOTEBOOK = Path(__file__).resolve().parents[1] / "training.ipynb"

# The notebook's parameters that differ from FinetuneConfig on purpose, and why.
NOTEBOOK_ON_PURPOSE = {
    "AMP": "the notebook runs on a Colab GPU, where autocast pays; FinetuneConfig's False suits a CPU, where it is "
           "ignored anyway",
    "NUM_WORKERS": "two loader processes on a Colab runtime; 0 (in the main process) is safe everywhere",
    "DATASET": "empty: the demo",
    "CKPT_DIR": "empty: Google Drive in Colab for a real run, a local folder for the demo",
}


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[name]


def option_defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    """``{--flag: default}`` of every optional argument (``--help`` left out)."""
    return {action.option_strings[-1]: action.default for action in parser._actions
            if action.option_strings and action.dest != "help"}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_prepare_has_the_defaults_of_prepare_datasets(dataset: str) -> None:
    standalone = option_defaults(subparser(prepare_datasets.build_parser(), dataset))
    prepare = option_defaults(subparser(finetune.build_parser(), "prepare"))
    shared = sorted(set(standalone) & set(prepare))
    assert {"--val-ratio", "--seed", "--random-forgeries"} <= set(shared)
    assert {flag: standalone[flag] for flag in shared} == {flag: prepare[flag] for flag in shared}


def test_the_notebook_prepares_and_trains_with_the_command_lines_defaults() -> None:
    names: dict = {}
    parameters = next(cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code")
    exec(parameters.source, names)  # plain assignments only
    prepare = option_defaults(subparser(finetune.build_parser(), "prepare"))
    assert (names["VAL_RATIO"], names["SEED"]) == (prepare["--val-ratio"], prepare["--seed"])
    settings = FinetuneConfig().to_dict()
    differ = {name for name, value in names.items() if name.lower() in settings and settings[name.lower()] != value}
    assert differ == set(NOTEBOOK_ON_PURPOSE), "a notebook parameter's default differs from FinetuneConfig's"


def test_train_takes_the_defaults_of_finetune_config() -> None:
    train = vars(finetune.build_parser().parse_args(["train", "cedar", "DATA_ROOT", "--out", "RUN"]))
    settings = FinetuneConfig().to_dict()
    assert {key: train[key] for key in settings if key in train and key not in ("data_root", "dataset")} == {
        key: settings[key] for key in settings if key in train and key not in ("data_root", "dataset")}
