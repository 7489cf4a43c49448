"""The results gallery of a batch: `_batches/<batch>/index.jsonl` for programs and `index.html` for people.

The page is one self-contained file (inline CSS and script, nothing fetched but the images) that opens from a
local directory, even after it is moved, or from a presigned S3 link. Its script marks each image
`data-state="loaded"` or `"broken"` and writes the totals into `#summary`, so expired or deleted images show.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import urlsplit

from producer.errors import StorageError
from worker.storage import Storage

__all__ = ["STATUSES", "IndexRow", "write_index"]

STATUSES = ("succeeded", "interrupted", "failed", "revoked", "expired", "queued", "started", "progress", "unknown")
_LINKABLE = {"http", "https", "file", "s3"}


@dataclass(frozen=True)
class IndexRow:
    """One job of a batch: its line in the batch file, its state, and its storage URLs as in its manifest."""

    line: int
    task_id: str
    status: str
    seconds: float | None
    images: list[str]
    frames: list[str]
    prompt: str
    seed: int | None
    sampler: str | None
    model: str
    error: str | None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {self.status!r}")


def write_index(
    storage: Storage, batch: str, rows: Sequence[IndexRow], *, expires: int = 7 * 24 * 3600
) -> tuple[str, str]:
    """Write the batch's `index.jsonl` and `index.html`; return (the JSONL's URL, a URL that opens the page).

    For S3 the page's URL and its image links are presigned for `expires` seconds (SigV4 allows at most 7 days).
    """
    if not batch or "/" in batch or batch in (".", ".."):
        raise StorageError(f"batch name {batch!r} must be one non-empty path segment, such as '2024-06-01-night'")
    ordered = sorted(rows, key=lambda row: row.line)
    jsonl_name, html_name = f"_batches/{batch}/index.jsonl", f"_batches/{batch}/index.html"
    lines = (json.dumps(dataclasses.asdict(row), ensure_ascii=False) + "\n" for row in ordered)
    jsonl_url = storage.put(jsonl_name, "".join(lines).encode(), "application/x-ndjson; charset=utf-8")

    def link(url: str) -> str:
        name = storage.name_of(url)
        return storage.link(name, index_name=html_name, expires=expires) if name else url

    page = _page(batch, ordered, link)
    storage.put(html_name, page.encode(), "text/html; charset=utf-8")
    opener = storage.link(html_name, index_name=html_name, expires=expires)
    # A signed link opens the page; a relative one (local storage) only means "this file", so give its URL.
    return jsonl_url, opener if urlsplit(opener).scheme else storage.url(html_name)


def _page(batch: str, rows: Sequence[IndexRow], link: Callable[[str], str]) -> str:
    """The gallery page; `link` turns a storage URL into one the page can open."""
    counts = Counter(row.status for row in rows)
    badges = "".join(
        f'<span class="badge {status}">{status} {counts[status]}</span>' for status in STATUSES if counts[status]
    )
    n_images = sum(len(row.images) for row in rows)
    return _HTML.format(
        title=escape(f"Batch {batch}"),
        batch=escape(batch),
        jobs=len(rows),
        badges=badges,
        n_images=n_images,
        cards="\n".join(_card(row, link) for row in rows),
        css=_CSS,
        script=_SCRIPT,
    )


def _card(row: IndexRow, link: Callable[[str], str]) -> str:
    hrefs = [_href(link(url)) for url in row.images]
    thumbs = "".join(
        f'<a href="{href}"><img src="{href}" alt="image {i} of {escape(row.task_id)}"></a>'
        for i, href in enumerate(hrefs)
    )
    facts = [
        ("seed", "" if row.seed is None else str(row.seed)),
        ("sampler", row.sampler or ""),
        ("model", row.model),
        ("time", "" if row.seconds is None else f"{row.seconds:.1f} s"),
    ]
    details = "".join(f"<dt>{name}</dt><dd>{escape(value) or '–'}</dd>" for name, value in facts)
    images = " ".join(
        f'<a href="{href}">{escape(_label(url))}</a>' for url, href in zip(row.images, hrefs, strict=True)
    )
    frames = " ".join(f'<a class="frame" href="{_href(link(url))}">{escape(_label(url))}</a>' for url in row.frames)
    return "".join(
        [
            f'<article class="card {row.status}" id="line-{row.line}">',
            f'<div class="thumbs">{thumbs}</div>' if thumbs else '<div class="placeholder">no image</div>',
            f'<p class="head"><span class="badge {row.status}">{row.status}</span> ',
            f'<span class="line">#{row.line}</span> <code>{escape(row.task_id)}</code></p>',
            f'<p class="prompt">{escape(row.prompt)}</p><dl>{details}</dl>',
            f'<p class="links">images: {images}</p>' if images else "",
            f'<p class="links">frames: {frames}</p>' if frames else "",
            f'<pre class="error">{escape(row.error)}</pre>' if row.error else "",
            "</article>",
        ]
    )


def _href(url: str) -> str:
    """`url` escaped for an attribute; a scheme a browser would run (javascript:, data:) becomes a dead link."""
    scheme = urlsplit(url).scheme.lower()
    return escape(url) if not scheme or scheme in _LINKABLE else "#"


def _label(url: str) -> str:
    """`image-0.png`, or `image-0/step-0005.png` for a frame."""
    path = urlsplit(url).path
    head, _, frame = path.rpartition("/frames/")
    return frame if head else path.rsplit("/", 1)[-1]


_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>Batch <code>{batch}</code></h1>
<p class="counts">{jobs} jobs {badges}</p>
<p id="summary" data-images="{n_images}">{n_images} images loading&hellip;</p>
</header>
<main class="grid">
{cards}
</main>
<script>{script}</script>
</body>
</html>
"""

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5rem 2rem; color: #222; background: #fafafa; }
header { position: sticky; top: 0; background: #fafafa; padding: .5rem 0; border-bottom: 1px solid #ddd; }
h1 { font-size: 1.3rem; margin: .3rem 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1rem; margin-top: 1rem; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6rem; overflow-wrap: anywhere; }
.thumbs { display: grid; grid-template-columns: repeat(auto-fit, minmax(100px, 1fr)); gap: 4px; }
.thumbs a { position: relative; display: block; }
.thumbs img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #eee; display: block; }
.thumbs img[data-state="broken"] { visibility: hidden; }
.missing { position: absolute; inset: 40% 10% auto; text-align: center; background: #b00020; color: #fff;
  border-radius: 3px; font-size: 12px; padding: 2px; }
.placeholder { aspect-ratio: 1; display: flex; align-items: center; justify-content: center; background: #eee;
  color: #888; }
.head, .prompt, .links { margin: .4rem 0; }
.prompt { font-style: italic; white-space: pre-wrap; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 0 .6rem; margin: .4rem 0; font-size: 12px; }
dt { color: #777; } dd { margin: 0; }
.links { font-size: 12px; } .links a { margin-right: .4rem; }
.error { white-space: pre-wrap; background: #fdecea; color: #8a1c1c; padding: .4rem; font-size: 12px; }
.badge { display: inline-block; margin-right: .2rem; padding: 0 .4rem; border-radius: 3px; background: #999;
  color: #fff; }
.badge.succeeded { background: #2e7d32; } .badge.interrupted { background: #558b2f; }
.badge.failed { background: #c62828; } .badge.expired { background: #757575; }
.badge.revoked { background: #6d4c41; } .badge.started, .badge.progress { background: #1565c0; }
.badge.queued { background: #757575; }
"""

# Listeners, not onload attributes: an image that settled before the script ran is counted from `complete`.
_SCRIPT = """
(function () {
  var images = document.querySelectorAll("main img"), loaded = 0, broken = 0;
  var summary = document.getElementById("summary");
  function settle(img, ok) {
    if (img.dataset.state) return;
    img.dataset.state = ok ? "loaded" : "broken";
    if (ok) { loaded++; } else {
      broken++;
      var badge = document.createElement("span");
      badge.className = "missing";
      badge.textContent = "image missing";
      img.parentNode.appendChild(badge);
    }
    report();
  }
  function report() {
    if (loaded + broken < images.length) return;
    summary.dataset.loaded = loaded;
    summary.dataset.broken = broken;
    summary.textContent = images.length + " images: " + loaded + " loaded, " + broken + " missing";
  }
  images.forEach(function (img) {
    img.addEventListener("load", function () { settle(img, true); });
    img.addEventListener("error", function () { settle(img, false); });
    if (img.complete) settle(img, img.naturalWidth > 0);
  });
  report();
})();
"""
