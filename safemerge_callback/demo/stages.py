"""Cached pipeline stages: each stage's output directory is named by a content hash of its inputs.

A stage is rebuilt only when no finished directory exists for its hash (or when forced). It is built in a hidden
staging directory and renamed into place when complete, so an interrupted run never leaves a directory that a
later run would take for finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_directory


logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
# Part of every hash: bump it when a stage's output format changes, so old caches are not reused.
CACHE_VERSION = 1


@dataclass
class StageOutput:
    """A finished stage.

    Attributes:
        name (`str`): stage name, e.g. `"aligned"`.
        key (`str`): 16 hex digits of the SHA-256 of the stage's inputs.
        path (`Path`): the finished directory `<output_dir>/<name>-<key>`.
        cached (`bool`): True when an earlier run had already built it.
        seconds (`float`): wall time of the build (as recorded when it was built, for cached stages).
    """

    name: str
    key: str
    path: Path
    cached: bool
    seconds: float


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    """Return the 16-hex-digit hash of a stage name and its JSON-serialisable inputs."""
    text = json.dumps({"stage": name, "version": CACHE_VERSION, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_stage(output_dir: str | Path, name: str, inputs: dict[str, Any], build: Callable[[Path], None], *,
              force: bool = False) -> StageOutput:
    """Return the finished directory of a stage, building it first unless a finished copy exists.

    Args:
        output_dir: directory that holds every stage of the demo.
        name: stage name; the directory is `<output_dir>/<name>-<key>`.
        inputs: everything the stage's result depends on (settings, data fingerprint, upstream stage keys); JSON
            serialisable.
        build: writes the stage's files into the directory it is given (a staging directory).
        force: rebuild even if a finished directory exists.

    Returns:
        `StageOutput`.
    """
    key = stage_key(name, inputs)
    final_dir = Path(output_dir) / f"{name}-{key}"
    record_path = final_dir / STAGE_FILE
    if record_path.is_file() and not force:
        record = json.loads(record_path.read_text())
        logger.info("Stage %s: reusing %s", name, final_dir)
        return StageOutput(name, key, final_dir, True, float(record.get("seconds", 0.0)))

    _remove_stale_staging(final_dir)
    logger.info("Stage %s: building %s", name, final_dir)
    start = time.perf_counter()
    with atomic_directory(final_dir, overwrite=True) as staging:
        build(staging)
        seconds = time.perf_counter() - start
        record = {"stage": name, "key": key, "seconds": seconds, "inputs": inputs,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # Written last: a directory without it is never reused.
        (staging / STAGE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return StageOutput(name, key, final_dir, False, seconds)


def _remove_stale_staging(final_dir: Path) -> None:
    """Delete staging directories that an interrupted earlier build of the same stage left behind."""
    if not final_dir.parent.is_dir():
        return
    for stale in final_dir.parent.glob(f".{final_dir.name}.partial-*"):
        logger.info("Removing the unfinished directory %s of an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
