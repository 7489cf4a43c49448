"""docs/models.md, run: every command of "Use your own model", in order, as a newcomer would paste them.

Only the downloads are stood in for: no hub is reachable here, so `hf download` is a small script that copies
the same file names out of local "repositories" made from the tiny models (a whole original-layout SDXL file, a
GGUF Flux transformer, each beside its diffusers directory), applying `--include`/`--exclude` as the real one does
(fnmatch on the path in the repository). Everything else is the page's own text: `render models --check`, a real
worker started in the background, `render submit --wait` against a private Redis.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from localfarm.cluster import RedisServer
from tests.single_files import write_gguf_transformer, write_sdxl_checkpoint
from worker.models import tiny_flux, tiny_sdxl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "models.md"
SECTIONS = ("SDXL from one downloaded file", "Flux.1 from a GGUF transformer")

HF = f"""#!{sys.executable}
# `hf download REPO [FILE ...] [--include P ...] [--exclude P ...] --local-dir DIR`, from local repositories.
import fnmatch, os, shutil, sys
from pathlib import Path

args, files, patterns, option, local = sys.argv[2:], [], {{"--include": [], "--exclude": []}}, None, None
assert sys.argv[1] == "download", sys.argv
repo = Path(os.environ["HF_TEST_REPOS"]) / args[0]
for arg in args[1:]:
    if arg in patterns or arg == "--local-dir":
        option = arg
    elif option == "--local-dir":
        local = Path(arg)
    elif option:
        patterns[option].append(arg)
    else:
        files.append(arg)
assert local is not None and repo.is_dir(), (repo, local)
names = files or [str(p.relative_to(repo)) for p in sorted(repo.rglob("*")) if p.is_file()]
for name in names:
    if patterns["--include"] and not any(fnmatch.fnmatch(name, p) for p in patterns["--include"]):
        continue
    if any(fnmatch.fnmatch(name, p) for p in patterns["--exclude"]):
        continue
    (local / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo / name, local / name)
    print(local / name)
"""


def bash_blocks(section: str) -> list[str]:
    """The ```bash blocks under the `## section` heading of docs/models.md, in order."""
    text = DOC.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start : end if end != -1 else len(text)], flags=re.S)


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub repositories the page downloads from, made of the tiny models under the real file names."""
    root = tmp_path_factory.mktemp("hub")
    sdxl = root / "stabilityai" / "stable-diffusion-xl-base-1.0"
    pipe = tiny_sdxl.build()
    pipe.save_pretrained(sdxl)
    write_sdxl_checkpoint(pipe, sdxl / "sd_xl_base_1.0.safetensors")
    flux = root / "black-forest-labs" / "FLUX.1-dev"
    pipe = tiny_flux.build()
    pipe.save_pretrained(flux)
    for whole in ("flux1-dev.safetensors", "ae.safetensors"):  # the page leaves these out of the download
        (flux / whole).write_bytes(b"not to be downloaded")
    gguf = root / "city96" / "FLUX.1-dev-gguf"
    gguf.mkdir(parents=True)
    write_gguf_transformer(pipe, gguf / "flux1-dev-Q8_0.gguf")
    return root


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.mark.parametrize("section", SECTIONS)
def test_every_command_of_the_page_renders_an_image(section: str, repos: Path, redis_url: str, tmp_path: Path) -> None:
    blocks = bash_blocks(section)
    assert len(blocks) >= 2 and any("render submit" in block for block in blocks), f"{section}: no commands found"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hf").write_text(HF)
    (bin_dir / "hf").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    out = tmp_path / "render-output"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HF_TEST_REPOS": str(repos),
        "RENDER_REDIS_URL": redis_url,
        "RENDER_STORAGE_URL": f"file://{out}",
        "PYTHONPATH": str(ROOT),
    }
    script = "set -euo pipefail\n" + "\n".join(blocks)
    log = tmp_path / "page.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            ["bash", "-c", script], cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=240)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the worker the page started in the background
            process.wait()
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    assert re.search(r"\bok\b", output), f"render models --check reported no ok model:\n{output[-4000:]}"
    assert '"status": "succeeded"' in output, output[-4000:]
    assert list(out.rglob("*.png")), f"no image stored under {out}"
    assert not any(fnmatch.fnmatch(p.name, "flux1-dev.safetensors") for p in work.rglob("*")), "an excluded file came"
