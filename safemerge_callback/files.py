"""File-system helpers: resolve local directories or hub ids, and write output directories atomically."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path


logger = logging.getLogger(__name__)


def resolve_directory(
    name_or_path: str | os.PathLike,
    *,
    role: str,
    allow_patterns: Sequence[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Return a local directory for `name_or_path`: the directory itself, or a hub snapshot of the listed files.

    Args:
        name_or_path: local directory or hub repo id (`org/name`).
        role: the directory's role for error messages (e.g. `"aligned model"`).
        allow_patterns: files to download for a hub id (glob patterns); everything else stays remote.
        revision: hub revision.

    Raises:
        ValueError: when a local-looking path does not exist, or a hub id cannot be fetched (offline or unknown).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise ValueError(f"The {role} {text!r} is a file; pass the directory that contains it.")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep == "\\" and "\\" in text:
        raise ValueError(f"The {role} directory {text!r} does not exist.")
    return _download_snapshot(text, role=role, allow_patterns=allow_patterns, revision=revision)


def _download_snapshot(repo_id: str, *, role: str, allow_patterns, revision) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, revision=revision))
    except Exception as error:  # hub errors come in many types (offline, 404, gated, network)
        offline = " HF_HUB_OFFLINE is set, so only files already in the hub cache can be used." if HF_HUB_OFFLINE else ""
        raise ValueError(
            f"Could not fetch the {role} {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {error}).{offline} "
            "Pass a local directory instead (e.g. one written by `save_pretrained`), or check the id, your network "
            "and your access to the repository."
        ) from error


def download_hub_files(repo_id: str, filenames: Sequence[str], revision: str | None = None) -> None:
    """Download the given files of a hub repo into the local hub cache (used for the shards a repair reads)."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, allow_patterns=list(filenames), revision=revision)


def check_not_inside(output_dir: Path, inputs: Sequence[Path | None]) -> None:
    """Raise a `ValueError` if `output_dir` is one of `inputs`, contains one or lies inside one (inputs stay as they are)."""
    output = Path(output_dir).resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if output == source or output in source.parents or source in output.parents:
            raise ValueError(
                f"The output directory {str(output_dir)!r} is, contains or lies inside the input {str(source)!r}; "
                "inputs are never modified. Choose another output directory."
            )


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `final_dir` and move it into place only if the block succeeds.

    A crash or kill during the block leaves a hidden `.NAME.partial-*` directory, never a partial `final_dir`. An
    existing `final_dir` is replaced (when `overwrite`) by two renames, so readers see the old or the new directory.

    Raises:
        FileExistsError: when `final_dir` exists and `overwrite` is False.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not overwrite:
        raise FileExistsError(f"Output directory {str(final_dir)!r} already exists; pass overwrite=True "
                              "(CLI: --overwrite) to replace it.")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.partial-", dir=final_dir.parent))
    try:
        yield staging
        _fsync_tree(staging)
        if final_dir.exists():
            retired = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final_dir, retired)
            os.rename(staging, final_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, final_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            # The bare OS message names neither the output nor what became of it.
            raise OSError(error.errno, f"No space left on device while writing {str(final_dir)!r}; nothing was "
                          "written under that name and an existing directory there is unchanged. Free disk space "
                          "or choose an output directory on another disk.") from error
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
