"""downloads.py against a real HTTP server on loopback: real gdown downloads, no mocks."""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gdown
import pytest

import downloads
from module.core.wording import use_interface


class RecordingHandler(SimpleHTTPRequestHandler):
    """Serves a folder and records each requested path (to prove a skip made no request)."""

    requested: list[str]

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


class LocalServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requested: list[str] = []
        handler = functools.partial(type("Handler", (RecordingHandler,), {"requested": self.requested}), directory=root)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def publish(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url(name)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # gdown's cookie file stays in the test's folder
    served = tmp_path / "served"
    served.mkdir()
    local = LocalServer(served)
    local.thread.start()
    yield local
    local.httpd.shutdown()
    local.httpd.server_close()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


PAYLOAD = b"signature weights " * 5000
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_good_file_is_downloaded_through_gdown(server: LocalServer, tmp_path: Path) -> None:
    url = server.publish("model.pth", PAYLOAD)
    target = tmp_path / "out" / "model.pth"
    path = downloads.download_file(url, target, md5=PAYLOAD_MD5, quiet=True)
    assert path == target and target.read_bytes() == PAYLOAD
    assert not list(target.parent.glob("*.part")), "gdown's temporary file must be renamed away"
    assert server.requested == ["/model.pth"]


def test_present_file_is_skipped_without_a_request(server: LocalServer, tmp_path: Path) -> None:
    url = server.publish("model.pth", PAYLOAD)
    target = tmp_path / "model.pth"
    downloads.download_file(url, target, quiet=True)
    downloads.download_file(url, target, quiet=True)
    downloads.download_file(url, target, md5=PAYLOAD_MD5, quiet=True)
    assert server.requested == ["/model.pth"]


def test_present_file_with_wrong_md5_is_downloaded_again(server: LocalServer, tmp_path: Path) -> None:
    url = server.publish("model.pth", PAYLOAD)
    target = tmp_path / "model.pth"
    target.write_bytes(PAYLOAD[:100])  # a truncated earlier download
    downloads.download_file(url, target, md5=PAYLOAD_MD5, quiet=True)
    assert target.read_bytes() == PAYLOAD
    assert server.requested == ["/model.pth"]


def test_bad_md5_raises_and_removes_the_file(server: LocalServer, tmp_path: Path) -> None:
    url = server.publish("model.pth", PAYLOAD)
    target = tmp_path / "model.pth"
    with pytest.raises(downloads.ChecksumMismatch) as caught:
        downloads.download_file(url, target, md5="0" * 32, quiet=True)
    message = str(caught.value)
    assert "model.pth" in message and PAYLOAD_MD5 in message and "Fix:" in message
    assert not target.exists(), "a file with the wrong MD5 must not be left as if valid"
    assert not list(tmp_path.glob("model.pth*"))
    # The next run downloads again instead of trusting a bad file.
    downloads.download_file(url, target, md5=PAYLOAD_MD5, quiet=True)
    assert server.requested == ["/model.pth", "/model.pth"]


def test_404_gives_a_one_line_message_naming_file_and_fix(server: LocalServer, tmp_path: Path) -> None:
    target = tmp_path / "CEDAR.zip"
    with pytest.raises(downloads.DownloadFailed) as caught:
        downloads.download_file(server.url("no-such-file.zip"), target, quiet=True)
    message = str(caught.value)
    assert "CEDAR.zip" in message and "HTTP 404" in message and "Fix:" in message
    assert "\n" not in message
    assert not target.exists() and not list(tmp_path.glob("*.part"))


def test_network_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(downloads.DownloadFailed, match=r"model\.pth.*network error.*Fix:"):
        downloads.download_file(f"http://127.0.0.1:{port}/model.pth", tmp_path / "model.pth", quiet=True)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_is_downloaded_extracted_once_and_skipped_after(server: LocalServer, tmp_path: Path, kind: str) -> None:
    members = {"CEDAR/full_org/original_1_1.png": b"png-1", "CEDAR/full_forg/forgeries_1_1.png": b"png-2"}
    data = zip_bytes(members) if kind == "zip" else tar_bytes(members)
    name = "CEDAR.zip" if kind == "zip" else "CEDAR.tar.gz"
    url = server.publish(name, data)
    spec = {name: {"id": url, "md5": hashlib.md5(data).hexdigest()}}
    downloads_dir, data_dir = tmp_path / "downloads", tmp_path / "data"

    paths = downloads.fetch_all(spec, downloads_dir, extract_to=data_dir)
    assert paths == [downloads_dir / name]
    for member, content in members.items():
        assert (data_dir / member).read_bytes() == content

    (data_dir / "CEDAR/full_org/original_1_1.png").write_bytes(b"edited")
    downloads.fetch_all(spec, downloads_dir, extract_to=data_dir)  # a "Run all" after a disconnect
    assert server.requested == [f"/{name}"]
    assert (data_dir / "CEDAR/full_org/original_1_1.png").read_bytes() == b"edited", "extraction must be skipped"


@pytest.mark.parametrize(
    ("kind", "evil_member"),
    [("zip", "../evil.txt"), ("zip", "data/../../evil.txt"), ("tar", "../evil.txt"), ("tar", "/tmp/evil.txt")],
)
def test_archive_escaping_its_folder_is_refused(server: LocalServer, tmp_path: Path, kind: str, evil_member: str) -> None:
    members = {"good/a.png": b"fine", evil_member: b"gotcha"}
    data = zip_bytes(members) if kind == "zip" else tar_bytes(members)
    name = "evil.zip" if kind == "zip" else "evil.tar.gz"
    url = server.publish(name, data)
    data_dir = tmp_path / "sandbox" / "data"

    with pytest.raises(downloads.UnsafeArchiveError) as caught:
        downloads.fetch_all({name: url}, tmp_path / "downloads", extract_to=data_dir)
    assert evil_member in str(caught.value) and name in str(caught.value)
    assert not (tmp_path / "sandbox" / "evil.txt").exists()
    assert not (data_dir / "good" / "a.png").exists(), "nothing is extracted from a refused archive"


def test_tar_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "links.tar.gz"
    archive.write_bytes(tar_bytes({"ok.txt": b"x"}, links={"escape": "../../etc/passwd"}))
    with pytest.raises(downloads.UnsafeArchiveError, match="escape"):
        downloads.extract_archive(archive, tmp_path / "out", quiet=True)


def test_not_an_archive_is_explained(tmp_path: Path) -> None:
    fake = tmp_path / "CEDAR.zip"
    fake.write_text("<html>Google Drive - Quota exceeded</html>")
    with pytest.raises(downloads.UnsafeArchiveError, match=r"CEDAR\.zip.*neither a zip nor a tar"):
        downloads.extract_archive(fake, tmp_path / "out", quiet=True)


def test_drive_ids_and_links_are_recognised() -> None:
    file_id = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    assert downloads.drive_file_id(file_id) == file_id
    assert downloads.drive_file_id(f"https://drive.google.com/file/d/{file_id}/view?usp=sharing") == file_id
    assert downloads.drive_file_id(f"https://drive.google.com/uc?id={file_id}&export=download") == file_id
    assert downloads.drive_file_id("https://example.org/model.pth") is None
    assert downloads.drive_file_id("weights.pth") is None


def test_drive_refusal_and_quota_messages_say_what_to_do() -> None:
    refused = gdown.exceptions.FileURLRetrievalError("Cannot retrieve the public link of the file.")
    why, fix = downloads._failure_reason(refused, "1AbCdEfGhIjKlMnOpQrStUvWxYz012345")
    assert "refused" in why and "Anyone with the link" in fix and "1AbCdEfGhIjKlMnOpQrStUvWxYz012345" in fix
    quota = gdown.exceptions.FileURLRetrievalError("Too many users have viewed or downloaded this file recently.")
    why, fix = downloads._failure_reason(quota, "1AbCdEfGhIjKlMnOpQrStUvWxYz012345")
    assert "quota" in why and "Make a copy" in fix


@pytest.fixture
def notebook_words():
    """Messages worded for the notebook, as its PART 1 sets them (``use_interface("notebook")``)."""
    use_interface("notebook")
    yield
    use_interface("python")


def test_bad_gdrive_ids_entry_is_explained(notebook_words) -> None:
    with pytest.raises(ValueError, match=r"GDRIVE_IDS\['CEDAR.zip'\]"):
        downloads.parse_download_items({"CEDAR.zip": 42})  # type: ignore[dict-item]


def test_resolve_pretrained(tmp_path: Path, server: LocalServer) -> None:
    assert downloads.resolve_pretrained("", tmp_path) is None
    assert downloads.resolve_pretrained(None, tmp_path) is None
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"w")
    assert downloads.resolve_pretrained(str(weights), tmp_path) == weights
    with pytest.raises(FileNotFoundError, match="pretrained='nope.pth' is neither"):  # in Python's words
        downloads.resolve_pretrained("nope.pth", tmp_path)
    use_interface("notebook")
    try:
        with pytest.raises(FileNotFoundError, match="PRETRAINED = 'nope.pth' is neither"):
            downloads.resolve_pretrained("nope.pth", tmp_path)
    finally:
        use_interface("python")
    url = server.publish("best.pth", PAYLOAD)
    assert downloads.resolve_pretrained(url, tmp_path / "dl").read_bytes() == PAYLOAD


def test_missing_requirements(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\n-r other.txt\nnumpy>=1.24\nscikit-learn>=1.2\nno-such-package-xyz==1.0\n")
    assert downloads.missing_requirements(requirements) == ["no-such-package-xyz"]


def test_outside_colab_nothing_is_mounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert not downloads.in_colab()
    assert downloads.mount_drive() is None
    assert downloads.persistent_dir("checkpoints", "run", local_root=tmp_path) == tmp_path / "checkpoints" / "run"


def test_notebook_setup_defaults_and_errors(monkeypatch: pytest.MonkeyPatch, notebook_words) -> None:
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    demo = downloads.resolve_notebook_setup("", "", "", None, "", 0.1, {"epochs": 2, "val_ratio": 0.25})
    assert demo.demo and demo.dataset == "cedar" and demo.val_ratio == 0.25
    assert demo.ckpt_dir == Path.cwd() / "checkpoints/demo" and demo.data_root == Path.cwd() / "data/demo"
    assert demo.config_overrides() == {
        "dataset": "cedar", "data_root": str(Path.cwd() / "data/demo"),
        "ckpt_dir": str(Path.cwd() / "checkpoints/demo"), "epochs": 2,
    }

    real = downloads.resolve_notebook_setup("CEDAR", "/data/CEDAR", "/ckpt", None, "", 0.1, {"epochs": 2, "val_ratio": 0.25})
    assert not real.demo and real.dataset == "cedar" and real.val_ratio == 0.1
    assert real.config_overrides() == {"dataset": "cedar", "data_root": "/data/CEDAR", "ckpt_dir": "/ckpt"}

    with pytest.raises(ValueError, match="DATA_ROOT is empty"):
        downloads.resolve_notebook_setup("cedar", "", "", None)
    with pytest.raises(ValueError, match="DATASET is empty and DEMO is False"):
        downloads.resolve_notebook_setup("", "", "", False)


def test_files_extracted_from_a_zip_keep_the_archive_times(tmp_path: Path) -> None:
    """A new Colab runtime extracts the archive again: the scans must keep their modification times, which key the
    feature store (zipfile alone would stamp them with the time of extraction)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("CEDAR/full_org/original_1_1.png", date_time=(2020, 5, 17, 10, 30, 4)), b"png")
    (tmp_path / "CEDAR.zip").write_bytes(buffer.getvalue())
    times = []
    for runtime in ("first", "second"):
        downloads.extract_archive(tmp_path / "CEDAR.zip", tmp_path / runtime, quiet=True)
        times.append((tmp_path / runtime / "CEDAR/full_org/original_1_1.png").stat().st_mtime)
    assert times[0] == times[1] == time.mktime((2020, 5, 17, 10, 30, 4, 0, 0, -1))
