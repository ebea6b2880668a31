"""pip installs the project (pyproject.toml names its modules and packages), and it imports from another folder.

`pip install .`, `pip install -e .` and `pip install git+URL` all build from
pyproject.toml; this test installs a copy of the project into a fresh folder,
offline, with the setuptools of this environment (requirements-dev.txt).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"training_utils.py", "model_v3.py", "sig_dataloader_colab.py", "prepare_datasets.py",
           "synthetic_signatures.py", "downloads.py", "finetune.py"}
PACKAGES = {"module", "models"}


def test_pip_install_into_a_fresh_folder_and_import_from_elsewhere(tmp_path: Path) -> None:
    # A copy: setuptools builds in the source folder (build/, *.egg-info), which must not litter the project.
    source = tmp_path / "source"
    top_level_only = {".git", ".venv", "venv", "runs", "data", "checkpoints", "build", "tests"}  # module/data stays
    everywhere = shutil.ignore_patterns("*.egg-info", "__pycache__", ".*cache", ".ipynb_checkpoints")
    shutil.copytree(ROOT, source, ignore=lambda folder, names: set(everywhere(folder, names)) | (
        top_level_only & set(names) if Path(folder) == ROOT else set()))
    target = tmp_path / "installed"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {path.name for path in target.iterdir() if not path.name.endswith(".dist-info")} - {"__pycache__"}
    assert installed == MODULES | PACKAGES, "only the project's modules and packages: no tests, tools or benchmarks"
    assert (target / "models" / "dsnet" / "dsnet.py").is_file() and (target / "module" / "verifier.py").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = (
        "import training_utils, model_v3, finetune, prepare_datasets, downloads\n"
        "from training_utils import Verifier, compute_writer_metrics\n"
        f"assert training_utils.__file__.startswith({str(target)!r}), training_utils.__file__\n"
        "print(sum(p.numel() for p in model_v3.ViT_for_OSV_DSNet().parameters()))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "21024544"
