"""The batch gallery, written to real storage (a directory, the moto S3 server) and opened in real headless Chromium."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pytest
from PIL import Image

from producer.errors import StorageError
from tests.browser import dump_dom
from worker.storage import LocalStorage, S3Storage, Storage, open_storage
from worker.views.gallery import IndexRow, write_index

HOSTILE = """<script>alert(1)</script> "double" 'single' & <img src=x onerror=alert(2)>"""
browser = pytest.mark.integration


class Dom(HTMLParser):
    """Every element of a dumped DOM as (tag, attributes), and the text inside each `p.prompt`."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.prompts: list[str] = []
        self._in_prompt = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.elements.append((tag, attributes))
        if tag == "p" and attributes.get("class") == "prompt":
            self._in_prompt = True
            self.prompts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_prompt = self._in_prompt and tag != "p"

    def handle_data(self, data: str) -> None:
        if self._in_prompt:
            self.prompts[-1] += data

    def all(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def one(self, tag: str, **attrs: str) -> dict[str, str]:
        (found,) = self.all(tag, **attrs)
        return found


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def job(storage: Storage, task: str, images: int, frames: int = 1) -> tuple[list[str], list[str]]:
    """Store a job's images and step frames the way the worker names them; return their URLs."""
    image_urls = [storage.put(f"renders/{task}/image-{i}.png", png(40 * i), "image/png") for i in range(images)]
    frame_urls = [
        storage.put(f"renders/{task}/frames/image-{i}/step-{5 * (s + 1):04d}.png", png(10 * s), "image/png")
        for i in range(images)
        for s in range(frames)
    ]
    return image_urls, frame_urls


def row(line: int, task: str, status: str, urls: tuple[list[str], list[str]], **fields: Any) -> IndexRow:
    values: dict[str, Any] = {
        "prompt": f"a lighthouse, take {line}",
        "seed": line,
        "sampler": "euler_a",
        "seconds": 1.5,
        "model": "tiny-sd",
        "error": None,
    }
    values.update(fields)
    return IndexRow(line=line, task_id=task, status=status, images=urls[0], frames=urls[1], **values)


def batch_rows(storage: Storage) -> list[IndexRow]:
    """Given out of line order: the index must sort them."""
    return [
        row(4, "task-hostile", "succeeded", job(storage, "task-hostile", 1), prompt=HOSTILE),
        row(1, "task-a", "succeeded", job(storage, "task-a", 1, frames=2)),
        row(3, "task-failed", "failed", ([], []), seconds=0.2, error="CUDA out of memory <b>bold</b>", seed=None),
        row(2, "task-b", "succeeded", job(storage, "task-b", 2)),
        row(5, "task-queued", "queued", ([], []), seconds=None, sampler=None),
    ]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "farm")
        return
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    s3 = open_storage(f"s3://{bucket}/prefix", s3_endpoint_url=server)
    assert isinstance(s3, S3Storage)
    yield s3
    s3.close()


def target(storage: Storage, page_url: str, href: str) -> str:
    """The storage URL a link on the page leads to."""
    if isinstance(storage, S3Storage):  # path-style presigned URL: /bucket/key?X-Amz-...
        assert "X-Amz-Signature=" in urlsplit(href).query
        return "s3:/" + unquote(urlsplit(href).path)
    return unquote(urljoin(page_url, href))


@browser
def test_gallery_opens_in_a_browser_with_every_image_loaded(storage: Storage) -> None:
    rows = batch_rows(storage)
    jsonl_url, html_url = write_index(storage, "night-1", rows, expires=3600)

    assert jsonl_url == storage.url("_batches/night-1/index.jsonl")
    data = storage.get("_batches/night-1/index.jsonl")
    assert data is not None
    records = [json.loads(line) for line in data.decode().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["status"] for r in records] == ["succeeded", "succeeded", "failed", "succeeded", "queued"]
    assert records == [dataclasses.asdict(r) for r in sorted(rows, key=lambda r: r.line)]
    assert list(records[0]) == [f.name for f in dataclasses.fields(IndexRow)]
    assert records[1]["images"] == [storage.url(f"renders/task-b/image-{i}.png") for i in range(2)]
    assert records[2]["images"] == [] and records[2]["error"] == "CUDA out of memory <b>bold</b>"

    if isinstance(storage, S3Storage):
        assert urlsplit(html_url).scheme == "http" and "X-Amz-Expires=3600" in html_url
    else:
        assert html_url == storage.url("_batches/night-1/index.html")
    dom = Dom(dump_dom(html_url))

    images = dom.all("img")
    assert len(images) == sum(len(r.images) for r in rows) == 4
    assert [img.get("data-state") for img in images] == ["loaded"] * 4
    assert all("loading" not in img for img in images)
    summary = dom.one("p", id="summary")
    assert (summary["data-loaded"], summary["data-broken"]) == ("4", "0")
    assert sorted(target(storage, html_url, img["src"]) for img in images) == sorted(u for r in rows for u in r.images)

    frames = [target(storage, html_url, a["href"]) for a in dom.all("a", **{"class": "frame"})]
    assert sorted(frames) == sorted(u for r in rows for u in r.frames) and len(frames) == 5

    assert len(dom.all("script")) == 1, "the prompt's <script> and <img> must stay text"
    assert dom.prompts[3] == HOSTILE
    assert len(dom.all("div", **{"class": "placeholder"})) == 2
    assert dom.one("article", id="line-3")["class"] == "card failed"
    assert [a["id"] for a in dom.all("article")] == [f"line-{n}" for n in range(1, 6)]


@browser
def test_a_deleted_image_shows_as_broken(storage: Storage) -> None:
    rows = batch_rows(storage)
    _, html_url = write_index(storage, "night-2", rows)
    if isinstance(storage, S3Storage):
        storage.client.delete_object(Bucket=storage.bucket, Key=storage._key("renders/task-b/image-1.png"))
    else:
        assert isinstance(storage, LocalStorage)
        (storage.root / "renders" / "task-b" / "image-1.png").unlink()

    dom = Dom(dump_dom(html_url))
    summary = dom.one("p", id="summary")
    assert (summary["data-loaded"], summary["data-broken"]) == ("3", "1")
    assert [img["alt"] for img in dom.all("img", **{"data-state": "broken"})] == ["image 1 of task-b"]
    assert len(dom.all("span", **{"class": "missing"})) == 1


@browser
def test_a_local_gallery_still_opens_after_its_directory_moves(tmp_path: Path) -> None:
    rows = batch_rows(LocalStorage(tmp_path / "farm"))
    write_index(LocalStorage(tmp_path / "farm"), "night-3", rows)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(tmp_path / "farm", moved)

    dom = Dom(dump_dom((moved / "_batches" / "night-3" / "index.html").as_uri()))
    assert (dom.one("p", id="summary")["data-loaded"], dom.one("p", id="summary")["data-broken"]) == ("4", "0")


@browser
def test_two_thousand_rows(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    shared = [job(storage, f"task-{i}", 1) for i in range(10)]
    statuses = ["succeeded", "failed", "revoked", "started"]
    rows = [row(n, f"task-{n}", statuses[n % 4], shared[n % 10] if n % 4 == 0 else ([], [])) for n in range(2000)]

    started = time.monotonic()
    _, html_url = write_index(storage, "big", rows)
    assert time.monotonic() - started < 5
    data = storage.get("_batches/big/index.jsonl")
    assert data is not None and len(data.decode().splitlines()) == 2000

    dom = Dom(dump_dom(html_url))
    assert len(dom.all("article")) == 2000
    assert (dom.one("p", id="summary")["data-loaded"], dom.one("p", id="summary")["data-broken"]) == ("500", "0")


def test_links_and_names_on_local_storage(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    url = storage.url("renders/t/image-0.png")
    assert storage.name_of(url) == "renders/t/image-0.png"
    assert storage.name_of("file:///elsewhere/renders/t/image-0.png") is None
    assert storage.name_of(storage.base_url + "/") is None
    assert storage.name_of(storage.base_url + "-other/x.png") is None
    link = storage.link("renders/t/image 0#.png", index_name="batches/b/index.html", expires=60)
    assert link == "../../renders/t/image%200%23.png"
    assert storage.link("a.png", index_name="index.html", expires=60) == "a.png"
    with pytest.raises(StorageError, match="'..'"):
        storage.link("../a.png", index_name="index.html", expires=60)


def test_links_on_s3_are_presigned(s3_server: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/prefix", s3_endpoint_url=s3_server)
    url = storage.link("renders/t/image-0.png", index_name="batches/b/index.html", expires=120)
    assert url.startswith(f"{s3_server}/{s3_bucket}/prefix/renders/t/image-0.png?")
    assert "X-Amz-Expires=120" in url
    assert storage.name_of(f"s3://{s3_bucket}/prefix/renders/t/image-0.png") == "renders/t/image-0.png"
    assert storage.name_of(f"s3://{s3_bucket}/other/image-0.png") is None


def test_foreign_and_unsafe_urls(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "farm")
    foreign = "https://cdn.example.com/renders/x/image-0.png?a=1&b=2"
    rows = [row(1, "x", "succeeded", ([foreign, "javascript:alert(1)"], []))]
    _, html_url = write_index(storage, "b", rows)
    page = (tmp_path / "farm" / "_batches" / "b" / "index.html").read_text()
    assert 'src="https://cdn.example.com/renders/x/image-0.png?a=1&amp;b=2"' in page
    assert "javascript:" not in page
    assert "http" not in page.replace(foreign.replace("&", "&amp;"), ""), "no external resource besides the image"


def test_invalid_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="status must be one of succeeded, interrupted, failed"):
        row(1, "x", "done", ([], []))
    assert row(1, "x", "interrupted", ([], [])).status == "interrupted"  # a step budget's end is a result too
    for batch in ("", "a/b", "..", "."):
        with pytest.raises(StorageError, match=f"batch name {batch!r} must be one non-empty path segment"):
            write_index(LocalStorage(tmp_path), batch, [])
