"""Imported once by the warm-start fork server (`localfarm.warm`): the libraries a worker imports, with the
settings `render` gives them before it imports them (no hub, quiet loaders), so a forked worker starts as a new one
would, minus the import time. The worker's Celery app comes with them: importing it reads no setting (the app is
built on first use), so each forked worker reads its own settings after the fork."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import boto3  # noqa: E402, F401
import celery  # noqa: E402, F401
import diffusers  # noqa: E402, F401
import kombu  # noqa: E402, F401
import rich.table  # noqa: E402, F401  (the `render` command's own imports)
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401
import typer  # noqa: E402, F401

import worker.celery_app  # noqa: E402, F401  (the process, the engine, the families' pipeline classes)
import worker.views.display  # noqa: E402, F401
