"""Getting files onto the machine: Google Drive in Colab, gdown downloads, safe archive extraction.

Used by training.ipynb (PART 1) and finetune.py. Everything here is safe to run
again: a file already present (and matching its MD5, when one is given) is not
downloaded again, and an archive already extracted is not extracted again, so
"Run all" after a Colab disconnect costs seconds.

gdown and requests are imported only when something is downloaded, so this module
loads before the notebook has installed every requirement.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import re
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from models.errors import InputError
from module.core.progress import progress_bar
from module.core.wording import option

COLAB_DRIVE_MOUNT = Path("/content/drive")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# Import names differ from distribution names for a few requirements.
IMPORT_NAME_OF = {"scikit-image": "skimage", "scikit-learn": "sklearn", "pillow": "PIL"}
DRIVE_ID_PATTERN = re.compile(r"^[-\w]{20,}$")


class DownloadFailed(InputError):
    """A file could not be fetched; the message says which file, why, and what to do."""


class ChecksumMismatch(DownloadFailed):
    """A downloaded file's MD5 differs from the expected one (the file was removed)."""


class UnsafeArchiveError(InputError):
    """An archive member would land outside the extraction folder (or is a device/link)."""


@dataclass(frozen=True)
class DownloadItem:
    """One file to fetch: saved as `filename` in the download folder."""

    filename: str
    source: str  # a Google Drive file id, a Drive share link, or any http(s) URL
    md5: str | None = None


# ---------------------------------------------------------------- Colab and Drive


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules


def mount_drive(mount_point: Path = COLAB_DRIVE_MOUNT) -> Path | None:
    """Mount Google Drive in Colab and return "MyDrive"; None outside Colab.

    Mounting twice is harmless: an already mounted Drive is returned as is.
    """
    if not in_colab():
        return None
    my_drive = Path(mount_point) / "MyDrive"
    if not my_drive.is_dir():
        from google.colab import drive  # only exists inside Colab

        drive.mount(str(mount_point))
    return my_drive


def persistent_dir(*parts: str, local_root: Path = Path(".")) -> Path:
    """A folder that outlives the runtime: on Google Drive in Colab, else under `local_root`.

    A checkpoint written to /content dies with a Colab runtime; one on Drive
    survives the disconnect and lets training resume.
    """
    my_drive = mount_drive()
    root = my_drive / "detailsemnet" if my_drive is not None else Path(local_root)
    return root.joinpath(*parts)


@dataclass(frozen=True)
class NotebookSetup:
    """The notebook's folder parameters with their defaults filled in (see resolve_notebook_setup)."""

    demo: bool
    dataset: str
    data_root: Path
    ckpt_dir: Path
    download_dir: Path
    val_ratio: float
    demo_settings: Mapping[str, Any] = field(default_factory=dict)

    def config_overrides(self) -> dict[str, Any]:
        """FinetuneConfig settings that replace the notebook's parameters: the folders, and in the demo its settings."""
        folders = {"dataset": self.dataset, "data_root": str(self.data_root), "ckpt_dir": str(self.ckpt_dir)}
        demo = {key: value for key, value in self.demo_settings.items() if key != "val_ratio"} if self.demo else {}
        return {**folders, **demo}


def resolve_notebook_setup(
    dataset: str,
    data_root: str,
    ckpt_dir: str,
    demo: bool | None = None,
    download_dir: str = "",
    val_ratio: float = 0.1,
    demo_settings: Mapping[str, Any] | None = None,
) -> NotebookSetup:
    """Fill in the defaults of the notebook's folder parameters (mounting Drive in Colab where they need it).

    demo None means "the demo when no dataset is named". For a real run, empty
    ckpt_dir and download_dir go to persistent_dir (Google Drive in Colab, so
    they survive a disconnect). The demo keeps them on the runtime's disk
    (checkpoints/demo, data/downloads), so that a first try asks for no Drive
    access; a folder given under /content/drive mounts Drive, in the demo too.
    The demo's synthetic corpus goes to data/demo (it is remade in seconds).
    demo_settings apply only in the demo: "val_ratio" replaces val_ratio, the
    other keys are FinetuneConfig settings returned by config_overrides().
    """
    demo = not dataset if demo is None else bool(demo)
    if not demo and not dataset:
        raise InputError(f"{option('dataset')} is empty and {option('demo')} is False. Fix: set {option('dataset')} to "
                         f"'cedar', 'gpds' or 'bhsig', or {option('demo', True)}.")
    if not demo and not data_root:
        raise InputError(f"{option('data_root')} is empty. Fix: set it to the {dataset} dataset's root folder.")
    demo_settings = dict(demo_settings or {})
    run_name = "demo" if demo else dataset.lower()
    if any(COLAB_DRIVE_MOUNT in Path(folder).absolute().parents for folder in (data_root, ckpt_dir, download_dir)
           if folder):
        mount_drive()

    def default_dir(*parts: str, local_root: Path = Path(".")) -> Path:
        return local_root.joinpath(*parts) if demo else persistent_dir(*parts, local_root=local_root)

    return NotebookSetup(
        demo=demo,
        dataset="cedar" if demo else dataset.lower(),
        # Absolute, because the paths are saved in checkpoints and pair-file records and read back from elsewhere.
        data_root=(Path(data_root) if data_root else Path("data") / "demo").absolute(),
        ckpt_dir=(Path(ckpt_dir) if ckpt_dir else default_dir("checkpoints", run_name)).absolute(),
        download_dir=(Path(download_dir) if download_dir else default_dir("downloads", local_root=Path("data"))).absolute(),
        val_ratio=demo_settings.get("val_ratio", val_ratio) if demo else val_ratio,
        demo_settings=demo_settings,
    )


def missing_requirements(requirements_file: Path | str) -> list[str]:
    """Names from a requirements file whose package cannot be imported here."""
    missing = []
    for line in Path(requirements_file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]
        import_name = IMPORT_NAME_OF.get(name.lower(), name.replace("-", "_"))
        if importlib.util.find_spec(import_name) is None:
            missing.append(name)
    return missing


# ---------------------------------------------------------------- downloads


def md5_of(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks (archives can be gigabytes)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def drive_file_id(source: str) -> str | None:
    """The Drive file id in `source` (a bare id or a Drive link), or None for other URLs."""
    if "://" not in source:
        return source if DRIVE_ID_PATTERN.match(source) else None
    for pattern in (r"drive\.google\.com/.*[?&]id=([-\w]+)", r"drive\.google\.com/file/(?:u/\d+/)?d/([-\w]+)"):
        match = re.search(pattern, source)
        if match:
            return match.group(1)
    return None


def _failure_reason(error: BaseException, file_id: str | None) -> tuple[str, str]:
    """(why, what to do) for an exception raised by gdown or requests."""
    import requests  # a dependency of gdown

    message = str(error)
    browser_hint = (
        f"open https://drive.google.com/file/d/{file_id}/view in a browser" if file_id else "open the URL in a browser"
    )
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 404:
            return "not found (HTTP 404)", f"check the file id or URL ({browser_hint} to see that it exists)"
        if status in (401, 403):
            return f"access denied (HTTP {status})", "share the file as 'Anyone with the link', or download it by hand"
        if status == 429:
            return "too many requests (HTTP 429)", "wait a few minutes and run this again"
        return f"the server answered HTTP {status}", "run this again later"
    if isinstance(error, (requests.ConnectionError, requests.Timeout)):
        return (
            f"network error ({type(error).__name__})",
            "check the connection (in Colab: Runtime > Reconnect) and run this again; a partial download resumes",
        )
    if isinstance(error, OSError):
        return f"could not write the file ({message})", "free some disk space or choose another folder"
    if "too many users" in message.lower() or "quota" in message.lower():
        return (
            "Google Drive's download quota for this file is used up",
            f"wait up to 24 hours, or {browser_hint}, 'Make a copy' to your own Drive and use the copy's id",
        )
    if type(error).__name__ == "FileURLRetrievalError":
        return (
            "Google Drive refused the file (not shared publicly, a wrong id, or its quota is used up)",
            f"{browser_hint}: if it opens, set sharing to 'Anyone with the link' or 'Make a copy' and use the "
            "copy's id; if it does not, the id is wrong",
        )
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return first_line, "run this again (a partial download resumes), or download the file by hand"


def download_file(source: str, destination: Path | str, md5: str | None = None, quiet: bool = False) -> Path:
    """Download `source` (Drive id, Drive link or URL) to `destination`, unless it is already there.

    A file already present is kept when no MD5 is given or when it matches; a
    present file with the wrong MD5 is downloaded again. gdown writes to a
    temporary ".part" file and renames it at the end, so an interrupted
    download never looks complete (and resumes next time). A downloaded file
    whose MD5 does not match is deleted and ChecksumMismatch is raised.
    Any other failure raises DownloadFailed naming the file, why and what to do.
    """
    destination = Path(destination)
    expected_md5 = md5.lower() if md5 else None
    if destination.is_file():
        if expected_md5 is None or md5_of(destination) == expected_md5:
            if not quiet:
                print(f"Already present, skipped: {destination}")
            return destination
        print(f"{destination} is present but its MD5 is not {expected_md5}: downloading it again")
        destination.unlink()

    import gdown
    import requests

    destination.parent.mkdir(parents=True, exist_ok=True)
    file_id = drive_file_id(source)
    where = {"id": file_id} if file_id else {"url": source}
    # gdown >= 6 adds DownloadError (e.g. an incomplete transfer); 5.x has only FileURLRetrievalError.
    gdown_errors = tuple(
        getattr(gdown.exceptions, name) for name in ("DownloadError", "FileURLRetrievalError")
        if hasattr(gdown.exceptions, name)
    )
    try:
        gdown.download(output=str(destination), quiet=quiet, resume=True, **where)
    except (requests.RequestException, OSError, *gdown_errors) as error:
        why, what_to_do = _failure_reason(error, file_id)
        raise DownloadFailed(f"Could not download {destination.name} from {source}: {why}. Fix: {what_to_do}.") from error

    if expected_md5 is not None:
        actual_md5 = md5_of(destination)
        if actual_md5 != expected_md5:
            destination.unlink()
            raise ChecksumMismatch(
                f"Downloaded {destination.name} from {source} but its MD5 is {actual_md5}, not {expected_md5}; "
                "the file was deleted. Fix: check the MD5 you gave, or that the id points to the right file "
                "(a quota or login page saved in its place also gives a wrong MD5)."
            )
    return destination


# ---------------------------------------------------------------- archives


def is_archive(path: Path | str) -> bool:
    """True for the zip and tar names extract_archive handles."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _check_member_path(archive: Path, member_name: str, target_dir: Path) -> None:
    """Refuse a member name that is absolute or climbs out of `target_dir`."""
    pure = PurePosixPath(member_name.replace("\\", "/"))
    resolved = (target_dir / pure).resolve()
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", member_name) or not resolved.is_relative_to(target_dir):
        raise UnsafeArchiveError(
            f"Refusing to extract {archive}: member '{member_name}' would be written outside {target_dir}. "
            "Fix: the archive is malformed or malicious; get it from a trusted source."
        )


def _checked_tar_members(archive: Path, tar: tarfile.TarFile, target_dir: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        _check_member_path(archive, member.name, target_dir)
        if member.issym() or member.islnk():
            link_base = (target_dir / member.name).parent if member.issym() else target_dir
            link_target = (link_base / member.linkname).resolve()
            if os.path.isabs(member.linkname) or not link_target.is_relative_to(target_dir):
                raise UnsafeArchiveError(
                    f"Refusing to extract {archive}: link '{member.name}' points outside {target_dir} "
                    f"('{member.linkname}'). Fix: get the archive from a trusted source."
                )
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(
                f"Refusing to extract {archive}: member '{member.name}' is a device or pipe, not a file. "
                "Fix: get the archive from a trusted source."
            )
    return members


@contextmanager
def _naming_target(archive: Path, target_dir: Path) -> Iterator[None]:
    """An ``OSError`` without a file name (a full disk mid-write) names where the archive was being extracted."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise type(error)(error.errno, f"cannot extract {archive.name} into {target_dir}: {error.strerror or error}"
                          + (" (free some space)" if error.errno == errno.ENOSPC else "")) from error


def extract_archive(archive: Path | str, target_dir: Path | str, quiet: bool = False) -> Path:
    """Extract a zip or tar archive into `target_dir`, safely and only once.

    Every member is checked before anything is written: an absolute path, a
    '..' that climbs out, or a link pointing outside raises UnsafeArchiveError
    naming the member. A marker file records a finished extraction (with the
    archive's size and time), so running this again is a no-op, and an
    interrupted extraction is simply redone.
    """
    archive = Path(archive)
    target_dir = Path(target_dir).resolve()
    if not archive.is_file():
        raise FileNotFoundError(f"Archive not found: {archive}. Fix: download it first (check the path).")
    stat = archive.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns}\n"
    marker = target_dir / f".{archive.name}.extracted"
    if marker.is_file() and marker.read_text() == stamp:
        if not quiet:
            print(f"Already extracted, skipped: {archive.name} -> {target_dir}")
        return target_dir

    target_dir.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.infolist()
            for member in members:
                _check_member_path(archive, member.filename, target_dir)
            for member in progress_bar(members, desc=f"Extracting {archive.name}", unit="file", disable=quiet):
                with _naming_target(archive, target_dir):
                    extracted = zipped.extract(member, target_dir)
                    # zipfile stamps files with the time of extraction; the archive's own time (as tar keeps it) lets
                    # the feature store recognise the scans when a new Colab runtime extracts the archive again.
                    archived_at = time.mktime((*member.date_time, 0, 0, -1))
                    os.utime(extracted, (archived_at, archived_at))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            members = _checked_tar_members(archive, tar, target_dir)
            # The "data" filter (Python >= 3.11.4) repeats these checks inside tarfile itself.
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in progress_bar(members, desc=f"Extracting {archive.name}", unit="file", disable=quiet):
                with _naming_target(archive, target_dir):
                    tar.extract(member, target_dir, **safety)
    else:
        raise UnsafeArchiveError(
            f"{archive} is neither a zip nor a tar archive (a download quota page saved in its place?). "
            "Fix: delete it and download it again."
        )
    marker.write_text(stamp)
    return target_dir


# ---------------------------------------------------------------- several files


def parse_download_items(spec: Mapping[str, str | Mapping[str, str]]) -> list[DownloadItem]:
    """Turn the notebook's GDRIVE_IDS into DownloadItems.

    `spec` maps a file name to a Drive id / link / URL, or to
    {"id": ..., "md5": ...}; e.g. {"CEDAR.zip": "1AbC...", "model.pth": {"id": "1XyZ...", "md5": "..."}}.
    """
    items = []
    for filename, value in spec.items():
        if isinstance(value, str):
            items.append(DownloadItem(filename, value))
        elif isinstance(value, Mapping) and "id" in value:
            items.append(DownloadItem(filename, value["id"], value.get("md5")))
        else:
            raise InputError(
                f"{option('gdrive_ids')}['{filename}'] = {value!r} is not understood. "
                "Fix: give a Drive file id or URL, or {'id': ..., 'md5': ...}."
            )
    return items


def fetch_all(
    spec: Mapping[str, str | Mapping[str, str]], download_dir: Path | str, extract_to: Path | str | None = None
) -> list[Path]:
    """Download every file of `spec` into `download_dir` and extract archives into `extract_to`.

    `extract_to` defaults to `download_dir`. Returns the downloaded paths.
    Files and extractions already done are skipped.
    """
    download_dir = Path(download_dir)
    extract_dir = Path(extract_to) if extract_to is not None else download_dir
    paths = []
    for item in parse_download_items(spec):
        path = download_file(item.source, download_dir / item.filename, md5=item.md5)
        if is_archive(path):
            extract_archive(path, extract_dir)
        paths.append(path)
    return paths


def resolve_pretrained(pretrained: str | Path | None, download_dir: Path | str) -> Path | None:
    """The local path of the pretrained weights: a file path as is, a Drive id or URL downloaded.

    None or "" means no pretrained weights (a fresh backbone).
    """
    if pretrained is None or str(pretrained).strip() == "":
        return None
    text = str(pretrained).strip()
    if Path(text).expanduser().is_file():
        return Path(text).expanduser()
    file_id = drive_file_id(text)
    if file_id is None and "://" not in text:
        raise FileNotFoundError(
            f"{option('pretrained', text)} is neither an existing file nor a Google Drive file id. "
            "Fix: give the path of a .pth file, a Drive file id, or leave it empty for a fresh backbone."
        )
    name = f"pretrained_{file_id}.pth" if file_id else Path(text.split("?", 1)[0]).name or "pretrained.pth"
    return download_file(text, Path(download_dir) / name)
