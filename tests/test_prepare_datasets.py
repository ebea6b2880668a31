"""Pair files: every layout's pair rules, splits, sampling, validation, reading, and the command line."""
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import prepare_datasets as pdm
from prepare_datasets import (
    PairFileError,
    ensure_pair_files,
    ensure_test_pair_file,
    generate_bhsig_pairs,
    generate_cedar_pairs,
    generate_gdps_pairs,
    make_synthetic_dataset,
    read_pair_file,
    sample_pair_file,
    validate_pair_file,
    writer_of,
)

PROJECT = Path(__file__).resolve().parents[1]


def _touch_cedar(root: Path, n_writers: int, n_genuine: int = 24, n_forged: int = 24) -> Path:
    """Empty files with CEDAR names: enough for pair rules, which never open an image."""
    (root / "full_org").mkdir(parents=True)
    (root / "full_forg").mkdir()
    for w in range(1, n_writers + 1):
        for n in range(1, n_genuine + 1):
            (root / f"full_org/original_{w}_{n}.png").touch()
        for n in range(1, n_forged + 1):
            (root / f"full_forg/forgeries_{w}_{n}.png").touch()
    (root / "full_org" / "Thumbs.db").touch()  # stray files are ignored
    return root


def _by_writer(path: str) -> dict[int, Counter]:
    counts: dict[int, Counter] = defaultdict(Counter)
    for a, b, label in read_pair_file(path).pairs:
        assert writer_of(a) == writer_of(b), "pairs are made within a writer"
        counts[writer_of(a)][label] += 1
    return counts


def _lines(path) -> list[str]:
    return Path(path).read_text().splitlines()


@pytest.fixture(scope="module")
def cedar55(tmp_path_factory):
    return _touch_cedar(tmp_path_factory.mktemp("cedar55"), 55)


# ---------------------------------------------------------------- CEDAR


def test_cedar_shared_split_counts(cedar55):
    result = generate_cedar_pairs(cedar55)
    assert result["counts"]["train"] == {"pairs": 34080, "genuine": 40 * 276, "forgery": 40 * 576}
    assert result["counts"]["test"] == {"pairs": 12780, "genuine": 15 * 276, "forgery": 15 * 576}
    assert set(result["files"]) == {"train", "test"}
    for split in ("train", "test"):
        per_writer = _by_writer(result["files"][split])
        assert sorted(per_writer) == result["writers"][split]
        assert all(c == Counter({1: 276, 0: 576}) for c in per_writer.values())
    assert not set(result["writers"]["train"]) & set(result["writers"]["test"])
    assert Path(result["files"]["train"]) == cedar55 / "gray_train.txt"


def test_cedar_is_deterministic_for_a_seed(cedar55, tmp_path):
    a = generate_cedar_pairs(cedar55, random_state=7, out_dir=tmp_path / "a")
    b = generate_cedar_pairs(cedar55, random_state=7, out_dir=tmp_path / "b")
    c = generate_cedar_pairs(cedar55, random_state=8, out_dir=tmp_path / "c")
    for split in ("train", "test"):
        assert Path(a["files"][split]).read_bytes() == Path(b["files"][split]).read_bytes()
    assert a["writers"]["test"] != c["writers"]["test"]


def test_cedar_paper_protocol(cedar55, tmp_path):
    full = generate_cedar_pairs(cedar55, out_dir=tmp_path / "full")
    result = generate_cedar_pairs(cedar55, paper_protocol=True, out_dir=tmp_path / "paper")
    assert len(result["writers"]["train"]) == 50 and len(result["writers"]["test"]) == 5
    for split in ("train", "test"):
        assert all(c == Counter({1: 276, 0: 276}) for c in _by_writer(result["files"][split]).values())
    # The 276 forgery pairs of a writer are drawn from its 576.
    all_pairs = set(read_pair_file(full["files"]["train"]).pairs) | set(read_pair_file(full["files"]["test"]).pairs)
    assert set(read_pair_file(result["files"]["test"]).pairs) <= all_pairs


def test_cedar_validation_split_is_writer_disjoint(cedar55, tmp_path):
    result = generate_cedar_pairs(cedar55, val_ratio=0.1, out_dir=tmp_path)
    writers = result["writers"]
    assert [len(writers[s]) for s in ("train", "val", "test")] == [34, 6, 15]
    assert (tmp_path / "gray_val.txt").is_file()
    assert len(set(writers["train"]) | set(writers["val"]) | set(writers["test"])) == 55


def test_cedar_on_a_synthetic_corpus(tmp_path):
    make_synthetic_dataset(tmp_path, "cedar", n_writers=4, n_genuine=5, n_forged=3, image_size=48, progress=False)
    result = generate_cedar_pairs(tmp_path, train_ratio=0.5, forgery_pairs_per_writer=6)
    assert result["counts"]["train"] == {"pairs": 2 * 16, "genuine": 2 * 10, "forgery": 2 * 6}
    report = validate_pair_file(tmp_path, "gray_train.txt")
    assert report.ok, report.summary()


def test_cedar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="full_org.*pass the folder that contains full_org"):
        generate_cedar_pairs(tmp_path)
    (tmp_path / "full_org").mkdir()
    with pytest.raises(FileNotFoundError, match="no CEDAR scans"):
        generate_cedar_pairs(tmp_path)
    _touch_cedar(tmp_path / "c", 3, 2, 2)
    with pytest.raises(ValueError, match="train_ratio"):
        generate_cedar_pairs(tmp_path / "c", train_ratio=1.0)


# ---------------------------------------------------------------- BHSig


def _touch_bhsig(root: Path, writers, prefix="H", n_genuine=3, n_forged=2) -> Path:
    for w in writers:
        (root / str(w)).mkdir(parents=True)
        for n in range(1, n_genuine + 1):
            (root / f"{w}/{prefix}-S-{w}-G-{n:02d}.tif").touch()
        for n in range(1, n_forged + 1):
            (root / f"{w}/{prefix}-S-{w}-F-{n:02d}.tif").touch()
    return root


@pytest.mark.parametrize("language, prefix, n_test", [("hindi", "H", 60), ("bengali", "B", 50)])
def test_bhsig_default_test_writers(tmp_path, language, prefix, n_test):
    _touch_bhsig(tmp_path, range(1, n_test + 3), prefix)
    result = generate_bhsig_pairs(tmp_path)
    assert result["language"] == language
    assert result["writers"]["test"] == list(range(1, n_test + 1))
    assert result["writers"]["train"] == [n_test + 1, n_test + 2]
    assert all(c == Counter({1: 3, 0: 6}) for c in _by_writer(result["files"]["train"]).values())


def test_bhsig_real_counts_and_given_test_writers(tmp_path):
    info = make_synthetic_dataset(tmp_path, "bhsig", n_writers=4, image_size=48, progress=False)
    assert (info["n_genuine"], info["n_forged"]) == (24, 30)
    result = generate_bhsig_pairs(tmp_path, language="hindi", test_writers=[2, 4], val_ratio=0.5)
    writers = result["writers"]
    assert writers["test"] == [2, 4] and len(writers["val"]) == 1 and sorted(writers["train"] + writers["val"]) == [1, 3]
    for split in ("train", "val", "test"):
        assert all(c == Counter({1: 276, 0: 720}) for c in _by_writer(result["files"][split]).values())
    again = generate_bhsig_pairs(tmp_path, test_writers=[2, 4], val_ratio=0.5, out_dir=tmp_path / "again")
    assert again["writers"] == result["writers"]


def test_bhsig_errors(tmp_path):
    _touch_bhsig(tmp_path / "Hindi", range(1, 4))
    with pytest.raises(FileNotFoundError, match="pass .*Hindi"):
        generate_bhsig_pairs(tmp_path)
    with pytest.raises(ValueError, match="holds hindi scans, not bengali"):
        generate_bhsig_pairs(tmp_path / "Hindi", language="bengali")
    with pytest.raises(ValueError, match="0 train writers"):
        generate_bhsig_pairs(tmp_path / "Hindi")  # all three writers fall in the default 1-60
    _touch_bhsig(tmp_path / "Hindi", [9], prefix="B")
    with pytest.raises(ValueError, match="mixes Hindi"):
        generate_bhsig_pairs(tmp_path / "Hindi", test_writers=[1])


# ---------------------------------------------------------------- GPDS


@pytest.fixture(scope="module")
def gpds(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpds")
    return make_synthetic_dataset(root, "gpds", n_writers=9, n_genuine=6, n_forged=4, image_size=48, progress=False)


def test_gpds_folder_split_reports_shared_writers(gpds, tmp_path):
    with pytest.warns(UserWarning, match="not writer-disjoint"):
        result = generate_gdps_pairs(gpds["root"], out_dir=tmp_path)
    assert result["shared_writers"] == gpds["shared_writers"]
    assert set(result["files"]) == {"train", "val", "test"}
    report = validate_pair_file(gpds["root"], tmp_path / "gray_train.txt")
    assert report.shared_writers[str(tmp_path / "gray_test.txt")] == gpds["shared_writers"]
    assert report.shared_writers[str(tmp_path / "gray_val.txt")] == []
    assert not report.ok and not report.missing_files and not report.malformed and not report.undecodable_files
    # The validation writers (val_ratio 0.1 of the writers only in train/) share no writer with train or test.
    assert len(result["writers"]["val"]) == 1 and validate_pair_file(gpds["root"], tmp_path / "gray_val.txt").ok
    assert set(result["writers"]["val"]) <= set(gpds["splits"]["train"]) - set(gpds["shared_writers"])
    # Names with spaces survive the round trip (the files are tab-separated).
    paths = {p for split in ("train", "val") for a, b, _ in read_pair_file(result["files"][split]).pairs for p in (a, b)}
    assert any(" (Copy)" in p for p in paths)
    # Pairs of a writer within one folder split: the shared writer's train part has 4 genuine, 2 forged.
    shared = gpds["shared_writers"][0]
    assert _by_writer(result["files"]["train"])[shared] == Counter({1: 6, 0: 8})
    full = [w for w in result["writers"]["train"] if w != shared]
    assert all(_by_writer(result["files"]["train"])[w] == Counter({1: 15, 0: 24}) for w in full)


def test_gpds_resplit_is_writer_disjoint_and_caps_keep_the_ratio(gpds, tmp_path):
    with pytest.warns(UserWarning, match="appear in both .*: pooled by the re-split"):
        result = generate_gdps_pairs(gpds["root"], resplit=True, val_ratio=0.2, test_ratio=0.3, max_train_pairs=50,
                                     out_dir=tmp_path)
    writers = result["writers"]
    assert [len(writers[s]) for s in ("train", "val", "test")] == [4, 2, 3]
    assert len(set(writers["train"]) | set(writers["val"]) | set(writers["test"])) == 9
    for split in ("val", "test"):
        assert all(c == Counter({1: 15, 0: 24}) for c in _by_writer(result["files"][split]).values())
        assert validate_pair_file(gpds["root"], result["files"][split]).ok
    train = result["counts"]["train"]
    assert train["pairs"] == 50 and train["genuine"] == round(50 * 15 / 39)
    with pytest.warns(UserWarning, match="pooled by the re-split"):
        again = generate_gdps_pairs(gpds["root"], resplit=True, val_ratio=0.2, test_ratio=0.3, max_train_pairs=50,
                                    out_dir=tmp_path / "again")
    assert Path(again["files"]["train"]).read_bytes() == Path(result["files"]["train"]).read_bytes()


def test_gpds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GPDS-style root holds train/genuine/"):
        generate_gdps_pairs(tmp_path)


def test_writer_of():
    assert writer_of("full_org/original_12_3.png") == 12
    assert writer_of("full_forg/forgeries_7_24.PNG") == 7
    assert writer_of("5/H-S-5-G-01.tif") == 5 and writer_of("5/B-S-5-F-30.tif") == 5
    assert writer_of("train/genuine/c-032-11 (Copy).jpg") == 32 and writer_of("test/032/forge/cf-032-01.jpg") == 32
    assert writer_of("notes/readme.txt") is None


# ---------------------------------------------------------------- reading pair files


def test_reads_tabs_spaces_crlf_bom_and_blank_lines(tmp_path):
    expected = [("a dir/c-001-01 (Copy).jpg", "b.png", 1), ("c.png", "d.png", 0), ("e.png", "g/f.png", 1)]
    text = "\ufeffa dir/c-001-01 (Copy).jpg\tb.png\t1\r\n\r\nc.png d.png 0\r\n   \ne.png\t g\\f.png \t1"
    (tmp_path / "p.txt").write_bytes(text.encode("utf-8"))
    parsed = read_pair_file(tmp_path / "p.txt")
    assert parsed.pairs == expected and parsed.problems == []
    assert parsed.line_numbers == [1, 3, 5] and parsed.n_lines == 3


@pytest.mark.parametrize(
    "line, message",
    [
        ("a.png b.png", "expected 3 fields"),
        ("a.png b.png 2", "label '2' is not 0 or 1"),
        ("a.png\tb.png\tyes", "label 'yes' is not 0 or 1"),
        ("my scans/a.png b.png 1", "paths with spaces need tab separators"),
        ("a.png\tb.png", "separated by tabs, found 2"),
    ],
)
def test_bad_lines_are_reported_with_their_numbers(tmp_path, line, message):
    (tmp_path / "p.txt").write_text(f"a.png\tb.png\t1\n\n{line}\n")
    parsed = read_pair_file(tmp_path / "p.txt")
    assert len(parsed.pairs) == 1
    assert parsed.problems[0][0] == 3 and message in parsed.problems[0][1]
    with pytest.raises(PairFileError, match=f"line 3: .*{message}"):
        parsed.raise_for_problems()


def test_written_files_are_tab_separated_with_lf(tmp_path):
    pdm.write_pair_file(tmp_path / "p.txt", [("x y.png", "z.png", 1)])
    assert (tmp_path / "p.txt").read_bytes() == b"x y.png\tz.png\t1\n"


# ---------------------------------------------------------------- sampling and validation


def test_sample_pair_file_keeps_the_class_ratio_and_order(cedar55, tmp_path):
    generate_cedar_pairs(cedar55, out_dir=tmp_path)
    counts = sample_pair_file(tmp_path / "gray_test.txt", tmp_path / "small.txt", 1000, random_state=3)
    assert counts["dst"] == {"pairs": 1000, "genuine": round(1000 * 276 / 852), "forgery": 1000 - round(1000 * 276 / 852)}
    source = _lines(tmp_path / "gray_test.txt")
    sampled = _lines(tmp_path / "small.txt")
    positions = [source.index(line) for line in sampled]
    assert positions == sorted(positions)
    sample_pair_file(tmp_path / "gray_test.txt", tmp_path / "again.txt", 1000, random_state=3)
    assert _lines(tmp_path / "again.txt") == sampled
    sample_pair_file(tmp_path / "gray_test.txt", tmp_path / "all.txt", 10**6)
    assert _lines(tmp_path / "all.txt") == source


def test_sample_pair_file_refuses_a_broken_file(tmp_path):
    (tmp_path / "bad.txt").write_text("a b c d\n")
    with pytest.raises(PairFileError, match="line 1"):
        sample_pair_file(tmp_path / "bad.txt", tmp_path / "out.txt", 1)


def test_validate_reports_every_problem(tmp_path):
    root = _touch_cedar(tmp_path, 3, 3, 2)
    (root / "gray_test.txt").write_text("full_org/original_3_1.png\tfull_org/original_3_2.png\t1\n")
    (root / "gray_train.txt").write_text(
        "full_org/original_1_1.png\tfull_org/original_1_2.png\t1\n"
        "full_org/original_1_2.png full_org/original_1_1.png 1\n"  # the same pair, reversed
        "full_org/original_1_1.png\tfull_forg/forgeries_1_9.png\t0\n"  # missing file
        "full_org/original_3_1.png\tfull_forg/forgeries_3_1.png\t0\n"  # writer 3 is a test writer
        "full_org/original_2_1.png\tfull_forg/forgeries_2_1.png\t7\n"  # bad label
        "\n"
        "only two\tfields\n"
    )
    report = validate_pair_file(root, "gray_train.txt")
    assert report.lines == 6 and report.genuine == 2 and report.forgery == 2
    assert report.writers == [1, 3]
    assert report.missing_files == ["full_forg/forgeries_1_9.png"]
    assert report.duplicates == [(2, 1)]
    assert [n for n, _ in report.malformed] == [5, 7]
    assert report.shared_writers == {str(root / "gray_test.txt"): [3]}
    assert not report.ok
    text = report.summary()
    for fragment in ("1 missing files", "line 2 repeats line 1", "line 5: label '7'", "also in", "PROBLEMS FOUND"):
        assert fragment in text
    assert validate_pair_file(root, "gray_train.txt", other_pair_files=[]).shared_writers == {}
    assert validate_pair_file(root, "gray_test.txt").ok is False  # shares writer 3 with gray_train.txt
    with pytest.raises(FileNotFoundError, match="gray_val.txt not found"):
        validate_pair_file(root, "gray_val.txt")


# ---------------------------------------------------------------- command line


def test_cli_round_trip(tmp_path, capsys):
    root = tmp_path / "corpus"
    assert pdm.main(["synthetic", str(root), "--writers", "3", "--genuine", "3", "--forged", "2", "--image-size", "48"]) == 0
    assert pdm.main(["cedar", str(root), "--train-ratio", "0.67", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    # --val-ratio 0.1 by default, as finetune.py prepare: one writer each for training, validation and testing.
    assert "15 scans of 3 writers" in out and all(f"{name}: 9 pairs (3 genuine, 6 forgery), 1 writer(s)" in out
                                                  for name in ("gray_train.txt", "gray_val.txt", "gray_test.txt"))
    assert pdm.main(["cedar", str(root), "--train-ratio", "0.67", "--seed", "1", "--val-ratio", "0"]) == 0
    assert "gray_train.txt: 18 pairs (6 genuine, 12 forgery), 2 writer(s)" in capsys.readouterr().out
    assert pdm.main(["validate", str(root), "gray_train.txt", "gray_test.txt"]) == 0
    assert pdm.main(["sample", str(root / "gray_train.txt"), str(root / "s.txt"), "9"]) == 0
    (root / "gray_test.txt").write_text("broken\n")
    assert pdm.main(["validate", str(root), "gray_test.txt"]) == 1
    assert "1 malformed lines" in capsys.readouterr().out
    assert pdm.main(["bhsig", str(tmp_path / "nowhere")]) == 1
    assert "error:" in capsys.readouterr().err


def test_cli_runs_as_a_script():
    done = subprocess.run([sys.executable, "prepare_datasets.py", "gpds", "--help"], cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 0 and "--resplit" in done.stdout


def test_ensure_pair_files_writes_once_and_follows_changes(tmp_path, recwarn):
    root = _touch_cedar(tmp_path, 5, 3, 2)
    files = ensure_pair_files("cedar", root, val_ratio=0.2, random_state=1)
    assert set(files) == {"train", "val", "test"} and (root / "pair_files.json").is_file()
    stamps = {s: Path(p).stat().st_mtime_ns for s, p in files.items()}
    assert ensure_pair_files("cedar", root, val_ratio=0.2, random_state=1) == files
    assert {s: Path(p).stat().st_mtime_ns for s, p in files.items()} == stamps
    assert not recwarn.list
    with pytest.warns(UserWarning, match="made with other arguments"):
        assert set(ensure_pair_files("cedar", root, random_state=1)) == {"train", "test"}
    assert not (root / "gray_val.txt").exists()  # a stale validation file would leak writers
    (root / "full_org/original_1_1.png").unlink()  # a referenced image disappears
    with pytest.warns(UserWarning, match="missing files"):
        ensure_pair_files("cedar", root, random_state=1)
    assert validate_pair_file(root, "gray_train.txt", check_images=False).ok  # the scans are empty placeholders


def test_ensure_pair_files_keeps_your_own_valid_files(tmp_path):
    root = _touch_cedar(tmp_path, 3, 3, 2)
    (root / "gray_train.txt").write_text("full_org/original_1_1.png full_org/original_1_2.png 1\n")
    (root / "gray_test.txt").write_text("full_org/original_2_1.png full_forg/forgeries_2_1.png 0\n")
    files = ensure_pair_files("cedar", root)
    assert files == {"train": str(root / "gray_train.txt"), "test": str(root / "gray_test.txt")}
    assert (root / "gray_train.txt").read_text() == "full_org/original_1_1.png full_org/original_1_2.png 1\n"
    with pytest.warns(UserWarning, match="gray_val.txt is missing"):
        ensure_pair_files("cedar", root, val_ratio=0.34)
    with pytest.raises(ValueError, match="unknown dataset 'mcyt'"):
        ensure_pair_files("mcyt", root)


def test_ensure_pair_files_reuses_its_record_from_a_relative_root(tmp_path, monkeypatch) -> None:
    from prepare_datasets import ensure_pair_files, make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "rel" / "data", layout="cedar", n_writers=4, n_genuine=4, n_forged=4,
                           image_size=96, progress=False)
    monkeypatch.chdir(tmp_path)
    first = ensure_pair_files("cedar", "rel/data", val_ratio=0.25)
    stamp = {split: Path(path).stat().st_mtime_ns for split, path in first.items()}
    second = ensure_pair_files("cedar", "rel/data", val_ratio=0.25)
    assert second == first and all(Path(path).is_file() for path in second.values())
    assert {split: Path(path).stat().st_mtime_ns for split, path in second.items()} == stamp


# ---------------------------------------------------------------- odd folders, evaluation's test file, validation


def test_odd_cedar_folders_are_reported_not_merged_or_dropped_silently(tmp_path):
    root = _touch_cedar(tmp_path, 4, 3, 2)
    for n in (1, 2):
        (root / f"full_forg/forgeries_2_{n}.png").unlink()  # writer 2: genuine scans, no forgery
    for n in (1, 2, 3):
        (root / f"full_org/original_3_{n}.png").unlink()  # writer 3: forgeries only
    (root / "full_org/original_04_4.png").touch()  # writer 4 spelled "04" beside "4"
    (root / "full_org/original_04_2.png").touch()  # ... and its sample 2 twice
    (root / "full_org/scan 7.png").touch()  # an image that follows no CEDAR name
    with pytest.warns(UserWarning) as caught:
        result = generate_cedar_pairs(root, train_ratio=0.67, random_state=3)
    notes = sorted(str(warning.message) for warning in caught)
    assert notes == sorted(result["notes"])
    assert any(note.startswith("writer 2: no forgeries: only genuine-genuine pairs are made") for note in notes)
    assert any(note.startswith("writer 3: forgeries only, no genuine signature: left out") for note in notes)
    assert any("writer 4: its number is written 04 and 4 (original_" in note and "taken as one writer" in note
               for note in notes)
    assert any("writer 4: genuine signature 2 has 2 files (original_04_2.png, original_4_2.png): all kept" in note
               for note in notes)
    assert any("1 image file(s) follow no original_{w}_{n} / forgeries_{w}_{n} name and are ignored: full_org/scan 7.png"
               in note for note in notes)
    writers = result["writers"]
    assert 3 not in writers["train"] + writers["test"] and sorted(writers["train"] + writers["test"]) == [1, 2, 4]
    by_writer = {**_by_writer(result["files"]["train"]), **_by_writer(result["files"]["test"])}
    assert by_writer[2] == Counter({1: 3}) and by_writer[4] == Counter({1: 10, 0: 10})  # 5 genuine scans, 2 forgeries


def test_failing_options_warn_of_no_rewrite_and_leave_the_files(tmp_path, recwarn):
    root = _touch_cedar(tmp_path, 4, 3, 2)
    ensure_pair_files("cedar", root, val_ratio=0.25)
    before = {name: (root / name).read_bytes() for name in ("gray_train.txt", "gray_val.txt", "gray_test.txt")}
    recwarn.clear()
    with pytest.raises(ValueError, match="too few for 1 test and 3 validation writers"):
        ensure_pair_files("cedar", root, val_ratio=0.7)
    assert not recwarn.list, "no 'replaced' warning before a failure"
    assert {name: (root / name).read_bytes() for name in before} == before
    with pytest.warns(UserWarning,
                      match=r"replaced the pair files gray_train.txt, gray_val.txt, gray_test.txt .*other arguments"):
        ensure_pair_files("cedar", root, val_ratio=0.5)


def test_evaluation_reads_the_test_file_there_and_writes_one_only_where_none_exists(tmp_path):
    made = _touch_cedar(tmp_path / "made", 5, 3, 2)
    ensure_pair_files("cedar", made, val_ratio=0.2, train_ratio=0.6)
    before = {path.name: path.read_bytes() for path in made.iterdir() if path.is_file()}
    assert ensure_test_pair_file("cedar", made) == str(made / "gray_test.txt")
    assert {path.name: path.read_bytes() for path in made.iterdir() if path.is_file()} == before

    bare = _touch_cedar(tmp_path / "bare", 5, 3, 2)
    assert ensure_test_pair_file("cedar", bare, random_state=1) == str(bare / "gray_test.txt")
    assert sorted(path.name for path in bare.iterdir() if path.is_file()) == ["gray_test.txt"]
    generate_cedar_pairs(bare, random_state=1, out_dir=tmp_path / "expected")
    assert (bare / "gray_test.txt").read_bytes() == (tmp_path / "expected/gray_test.txt").read_bytes()


def test_validate_checks_writers_between_files_of_any_name_and_image_headers(tmp_path, capsys):
    make_synthetic_dataset(tmp_path, "cedar", n_writers=3, n_genuine=3, n_forged=2, image_size=48, progress=False)
    (tmp_path / "mine_a.txt").write_text("full_org/original_1_1.png\tfull_org/original_1_2.png\t1\n")
    (tmp_path / "mine_b.txt").write_text("full_org/original_1_3.png\tfull_forg/forgeries_1_1.png\t0\n"
                                         "full_org/original_2_1.png\tfull_org/original_2_2.png\t1\n")
    assert pdm.main(["validate", str(tmp_path), "mine_a.txt", "mine_b.txt"]) == 1
    out = capsys.readouterr().out
    assert out.count("1 writer(s) also in") == 2 and "mine_b.txt: [1]" in out and "mine_a.txt: [1]" in out
    report = validate_pair_file(tmp_path, "mine_b.txt", other_pair_files=["mine_a.txt"])
    assert report.shared_writers == {str(tmp_path / "mine_a.txt"): [1]} and report.undecodable_files == []

    # A Git LFS pointer saved under an image's name (what a clone without git-lfs holds), and a web page.
    (tmp_path / "full_org/original_2_2.png").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 12345\n")
    (tmp_path / "full_org/original_2_1.png").write_text("<html>quota exceeded</html>")
    report = validate_pair_file(tmp_path, "mine_b.txt", other_pair_files=[])
    assert [path for path, _ in report.undecodable_files] == ["full_org/original_2_1.png", "full_org/original_2_2.png"]
    assert "git lfs pull" in report.undecodable_files[1][1] and not report.ok
    assert "2 images that do not decode" in report.summary()
    assert validate_pair_file(tmp_path, "mine_b.txt", other_pair_files=[], check_images=False).ok


def test_errors_name_the_flags_of_the_command_line_in_use(tmp_path, capsys):
    _touch_bhsig(tmp_path, range(1, 4))
    assert pdm.main(["bhsig", str(tmp_path)]) == 1
    assert "e.g. --test-writers 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"e\.g\. test_writers=\[1\]"):
        generate_bhsig_pairs(tmp_path)
    assert pdm.main(["bhsig", str(tmp_path), "--test-writers", "1", "--val-ratio", "0.9"]) == 1
    assert "lower --val-ratio" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"resplit is not an option of bhsig \(its options: language, test_writers\)"):
        ensure_pair_files("bhsig", tmp_path, resplit=True)
    # What makes a missing validation file repeats the options the other files were made with.
    assert pdm.main(["bhsig", str(tmp_path), "--test-writers", "1,3", "--val-ratio", "0"]) == 0
    assert pdm.pair_file_fix("bhsig", tmp_path, ["val"]) == (
        f"prepare_datasets.ensure_pair_files('bhsig', {str(tmp_path)!r}, val_ratio=0.1, "
        "test_writers=[1, 3])")
    from module.core.wording import command_line

    with command_line("finetune.py"):
        assert pdm.pair_file_fix("bhsig", tmp_path, ["val"]) == (
            f"python finetune.py prepare bhsig {tmp_path} --val-ratio 0.1 --test-writers 1,3")
