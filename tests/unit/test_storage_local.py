"""The local-directory storage backend, on a real temporary directory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from producer import StorageError
from worker.storage import LocalStorage, S3Storage, open_storage


def test_round_trip_and_urls(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    url = storage.put("job/frames/step-005.png", b"\x89PNG data", "image/png")
    assert url == f"{tmp_path.as_uri()}/job/frames/step-005.png" == storage.url("job/frames/step-005.png")
    assert (tmp_path / "job" / "frames" / "step-005.png").read_bytes() == b"\x89PNG data"
    assert storage.get("job/frames/step-005.png") == b"\x89PNG data"
    assert storage.get("job/missing.png") is None


def test_put_replaces_an_existing_object(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("job/image-0.png", b"first attempt", "image/png")
    storage.put("job/image-0.png", b"second", "image/png")
    assert storage.get("job/image-0.png") == b"second"
    assert [p.name for p in (tmp_path / "job").iterdir()] == ["image-0.png"], "no temp file is left behind"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("/etc/passwd", "must be relative"),
        ("job/../../escape.png", "'..'"),
        ("job/./image.png", "'.'"),
        ("job//image.png", "empty"),
        ("job\\image.png", "'/' separators"),
        ("job/image\x00.png", "control character"),
        ("job/", "empty"),
        ("..", "'..'"),
        ("job/image\n.png", "control character"),
        ("job/image\x85.png", "control character"),
    ],
)
def test_bad_object_names_are_refused(tmp_path: Path, name: str, problem: str) -> None:
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageError, match=problem):
        storage.put(name, b"x", "text/plain")
    with pytest.raises(StorageError, match=problem):
        storage.get(name)
    with pytest.raises(StorageError, match=problem):
        storage.url(name)
    assert not (tmp_path / "escape.png").exists()
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*"))


def test_concurrent_puts_all_land_intact(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    payloads = {f"job/frames/step-{i:03d}.png": bytes([i]) * (50_000 + i) for i in range(40)}

    def write(names: list[str]) -> None:
        for name in names:
            storage.put(name, payloads[name], "image/png")

    names = sorted(payloads)
    threads = [threading.Thread(target=write, args=(names[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(storage.get(name) == data for name, data in payloads.items())
    assert sorted(p.name for p in (tmp_path / "job" / "frames").iterdir()) == [n.rsplit("/", 1)[1] for n in names]


def test_concurrent_puts_of_one_name_leave_one_whole_object(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    versions = [bytes([i]) * 200_000 for i in range(8)]
    threads = [
        threading.Thread(target=storage.put, args=("job/manifest.json", v, "application/json")) for v in versions
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert storage.get("job/manifest.json") in versions
    assert [p.name for p in (tmp_path / "job").iterdir()] == ["manifest.json"]


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        LocalStorage(tmp_path).put("job/image-0.png", b"x", "image/png")
    finally:
        os.umask(old)
    assert (tmp_path / "job" / "image-0.png").stat().st_mode & 0o777 == 0o644, "readable by a web server, not 0600"


def test_write_error_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "job").write_text("a file where a directory must go")
    with pytest.raises(StorageError, match="cannot write"):
        LocalStorage(tmp_path).put("job/image-0.png", b"x", "image/png")


def test_open_storage_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_storage(tmp_path.as_uri()), LocalStorage)
    assert open_storage(tmp_path.as_uri()).base_url == tmp_path.as_uri()
    assert open_storage(str(tmp_path)).base_url == tmp_path.as_uri()
    monkeypatch.chdir(tmp_path)
    assert open_storage("file://./out").base_url == (tmp_path / "out").as_uri()
    assert open_storage("relative/dir").base_url == (tmp_path / "relative" / "dir").as_uri()
    spaced = tmp_path / "with space"
    assert open_storage(spaced.as_uri()).put("a.txt", b"x", "text/plain") == f"{spaced.as_uri()}/a.txt"
    assert (spaced / "a.txt").read_bytes() == b"x"
    s3 = open_storage("s3://bucket/some/prefix/", s3_endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Storage) and s3.base_url == "s3://bucket/some/prefix"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty"),
        ("s3://", "names no bucket"),
        ("ftp://host/x", "unknown scheme 'ftp'"),
        ("file://otherhost/x", "names a host"),
        ("file://", "names no directory"),
        ("s3://bucket/prefix?versionId=1", "query or fragment"),
        ("s3://bad:bucket/x", "invalid bucket"),
    ],
)
def test_open_storage_rejects_bad_urls(url: str, problem: str) -> None:
    with pytest.raises(StorageError, match=problem) as caught:
        open_storage(url)
    assert "s3://bucket[/prefix]" in str(caught.value)


def test_open_storage_never_echoes_credentials_in_a_url() -> None:
    with pytest.raises(StorageError, match="must not contain credentials") as caught:
        open_storage("s3://AKIAEXAMPLE:hunter2@bucket/prefix")
    assert "hunter2" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)
