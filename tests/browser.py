"""Real headless Chromium for tests that open a page and read the DOM after its scripts ran."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest

__all__ = ["chromium_path", "dump_dom", "ensure_chromium"]

NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_SECONDS = 600


def chromium_path() -> str | None:
    """The Chromium (or Chrome) executable, or None when none is installed."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return next((path for path in map(shutil.which, NAMES) if path), None)


def ensure_chromium() -> str:
    """Chromium's path; installs Debian's `chromium` with apt-get when missing (root only), else skips the test."""
    path = chromium_path()
    if path:
        return path
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs chromium; install it (apt-get install chromium) or run the tests as root")
    deadline = time.monotonic() + INSTALL_SECONDS
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    problem = "apt-get did not install it"
    # Fresh containers have no package lists: the first install then fails, and one `apt-get update` fixes it.
    for command in (install, ["apt-get", "update"], install):
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=max(deadline - time.monotonic(), 1)
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = f"`{' '.join(command)}` failed: {exc}"
            break
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:]
            problem = f"`{' '.join(command)}` exited with {done.returncode}: {last[0] if last else 'no output'}"
        path = chromium_path()
        if path:
            return path
    pytest.skip(f"needs chromium, which could not be installed: {problem}")


def dump_dom(url: str, *, budget_ms: int = 15000) -> str:
    """The DOM of `url` as headless Chromium serializes it after the page's scripts ran.

    `--virtual-time-budget` lets the page run until it is idle (all images settled) or the budget is spent.
    """
    chromium = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--allow-file-access-from-files",
            f"--virtual-time-budget={budget_ms}",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ]
        seconds = budget_ms / 1000 + 15
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=seconds)
        except subprocess.TimeoutExpired:
            # A JavaScript dialog (an injected alert()) stops virtual time, and headless Chromium waits forever.
            raise RuntimeError(
                f"chromium did not finish {url} in {seconds:.0f} s; does the page open a dialog?"
            ) from None
    if done.returncode != 0 or not done.stdout:
        raise RuntimeError(f"chromium exited with {done.returncode} for {url}: {done.stderr[-2000:]}")
    return done.stdout
