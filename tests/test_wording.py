"""Messages name what to change in the words of the interface in use: a flag, a notebook parameter or an argument.

Each error below is raised by the project's own code under each of the three
interfaces; then the source is read to check that no other message names
one without going through ``module.core.wording``.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import finetune
from module.core import wording
from module.data.datasets.bhsig import generate_bhsig_pairs
from module.run.config import FinetuneConfig
from module.run.folder import start_over
from prepare_datasets import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def words_of(interface: str) -> Iterator[None]:
    if interface == "command line":
        with wording.command_line("finetune.py"):
            yield
        return
    wording.use_interface(interface)
    try:
        yield
    finally:
        wording.use_interface("python")


def message(interface: str, raise_it: Callable[[], object]) -> str:
    with words_of(interface), pytest.raises(Exception) as raised:
        raise_it()
    return str(raised.value)


# (what raises, then the words expected on the command line, in the notebook, in Python)
CASES = {
    "start over": (lambda: (_ for _ in ()).throw(start_over("the folder holds no usable checkpoint")),
                   "--no-resume", "RESUME = False", "resume=False"),
    "a bad setting": (lambda: FinetuneConfig(epochs=0), "--epochs must be >= 1", "EPOCHS must be >= 1",
                      "epochs must be >= 1"),
    "a boolean setting": (lambda: FinetuneConfig(finetune="all"), "--no-fast-head-only",
                          "FAST_HEAD_ONLY = False", "fast_head_only=False"),
    "the run folder": (lambda: finetune._require_run_folder(Path(__file__)), "--out", "CKPT_DIR", "ckpt_dir"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_interface_gets_its_own_words(case: str) -> None:
    raise_it, *expected = CASES[case]
    texts = {interface: message(interface, raise_it) for interface in wording.INTERFACES}
    by_interface = dict(zip(("command line", "notebook", "python"), expected))
    for interface, words in by_interface.items():
        assert words in texts[interface], (interface, texts[interface])
        others = [other for name, other in by_interface.items() if name != interface and other not in words]
        assert not [other for other in others if other in texts[interface]], (interface, texts[interface])


def test_a_layout_option_in_each_interface(tmp_path: Path) -> None:
    """BHSig with fewer writers than the default test split: the fix names the option as each interface sets it."""
    root = tmp_path / "Hindi"
    make_synthetic_dataset(root, "bhsig", n_writers=3, n_genuine=3, n_forged=2, image_size=64, progress=False)
    texts = {interface: message(interface, lambda: generate_bhsig_pairs(root, test_writers=range(50, 60)))
             for interface in wording.INTERFACES}
    assert "--test-writers 1" in texts["command line"]
    assert 'PREPARE_OPTIONS["test_writers"] = [1]' in texts["notebook"]
    assert "test_writers=[1]" in texts["python"]


def test_booleans_and_renamed_settings_as_each_interface_writes_them() -> None:
    expected = {"command line": ("--no-resume", "--resume", "--out runs/a", "--seed 3"),
                "notebook": ("RESUME = False", "RESUME = True", "CKPT_DIR = 'runs/a'", "SEED = 3"),
                "python": ("resume=False", "resume=True", "ckpt_dir='runs/a'", "random_state=3")}
    for interface, words in expected.items():
        with words_of(interface):
            assert (wording.option("resume", False), wording.option("resume", True), wording.option("ckpt_dir", "runs/a"),
                    wording.option("random_state", 3)) == words


# A flag, a notebook parameter of this project, or a Python keyword argument set to a value.
NOTEBOOK_PARAMETERS = sorted({name.upper() for name in FinetuneConfig.setting_types()} |
                             {"RESUME", "PREPARE_OPTIONS", "GDRIVE_IDS", "DEMO", "VAL_RATIO", "SEED"})
NAMING = re.compile(r"(?<![\w-])--[a-z][a-z-]+|\b(?:" + "|".join(NOTEBOOK_PARAMETERS) + r")\b\s?=|"
                    r"\b(?:" + "|".join(FinetuneConfig.setting_types()) + r"|resume)=")
# Code that speaks one interface only: the command lines (their own flags), and the model floor, which lies below the
# wording mechanism and names only its own Python arguments.
ONE_INTERFACE = {"finetune.py", "prepare_datasets.py", "core/wording.py"}


def message_strings(path: Path) -> Iterator[tuple[int, str]]:
    """String constants of ``path`` that can end up in a message: not docstrings, reprs or argparse definitions."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skipped.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.FunctionDef) and node.name == "__repr__":
            skipped.update(id(child) for child in ast.walk(node))
        if isinstance(node, ast.Call) and (getattr(node.func, "attr", "") in ("add_argument", "add_parser")
                                           or getattr(node.func, "id", "") == "step"):  # step: the wording's own
            skipped.update(id(child) for child in ast.walk(node))
        if isinstance(node, ast.Dict):  # help texts of settings and options, shown by --help
            skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            yield node.lineno, node.value


def test_no_message_names_an_option_except_through_the_wording() -> None:
    files = [*ROOT.glob("module/**/*.py"), ROOT / "training_utils.py", ROOT / "downloads.py",
             ROOT / "sig_dataloader_colab.py", ROOT / "synthetic_signatures.py"]
    found = [f"{path.relative_to(ROOT)}:{line}: {text[:100]!r}"
             for path in files if not any(str(path).endswith(name) for name in ONE_INTERFACE)
             for line, text in message_strings(path) if NAMING.search(text)]
    assert not found, "\n".join(found)
