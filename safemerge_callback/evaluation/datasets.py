"""Loaders for evaluation prompt sets, returning plain lists of dict records.

Each loader accepts a local file (CSV, JSON or JSONL) or a Hugging Face hub dataset id (loaded with
``datasets.load_dataset``, so it needs network access). Columns are picked with a documented default
mapping that can be overridden per field:

* :func:`load_harmful_prompts` -> ``{"id", "prompt"}``. Prompt column: the first of
  :data:`DEFAULT_PROMPT_COLUMNS` present (``goal`` for AdvBench's ``harmful_behaviors.csv``). A CSV
  with a single column whose first cell is not a known column name is read as headerless, one
  prompt per line (AdvBench's goals-only file).
* :func:`load_task_set` -> GSM8K ``{"id", "question", "answer", "gold"}`` from ``question`` and
  ``answer`` (the gold is the number after ``####``), or PubMedQA
  ``{"id", "question", "context", "long_answer", "gold"}``. PubMedQA also reads the original
  PQA-L layout: ``ori_pqal.json`` (a dict keyed by PMID with ``QUESTION``, ``CONTEXTS``,
  ``LONG_ANSWER`` and ``final_decision``), given as the file or its folder. When
  ``test_ground_truth.json`` sits beside it, the default split is its 500 official test PMIDs.
* :func:`load_xstest` -> ``{"id", "prompt", "label", "type"}`` from ``prompt``, ``label``
  (``safe``/``unsafe``) and ``type``, as in ``xstest_prompts.csv``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_COLUMNS = ("prompt", "goal", "instruction", "behavior", "question", "text")
DEFAULT_QUESTION_COLUMNS = ("question", "QUESTION", "problem", "prompt")
DEFAULT_GSM8K_ANSWER_COLUMNS = ("answer", "solution", "target")
DEFAULT_PUBMEDQA_ANSWER_COLUMNS = ("final_decision", "answer", "label")
DEFAULT_CONTEXT_COLUMNS = ("context", "CONTEXTS", "contexts")
DEFAULT_LONG_ANSWER_COLUMNS = ("long_answer", "LONG_ANSWER")
DEFAULT_LABEL_COLUMNS = ("label",)
DEFAULT_TYPE_COLUMNS = ("type",)

PUBMEDQA_RECORDS_FILE = "ori_pqal.json"
PUBMEDQA_TEST_LABELS_FILE = "test_ground_truth.json"

# Hub datasets whose config and split are not obvious; loading from the hub is not exercised offline.
HUB_DEFAULTS: dict[str, tuple[str | None, str]] = {
    "openai/gsm8k": ("main", "test"),
    "qiaojin/PubMedQA": ("pqa_labeled", "train"),
    "walledai/AdvBench": (None, "train"),
    "walledai/XSTest": (None, "test"),
}

_FILE_SUFFIXES = (".csv", ".json", ".jsonl")


def _read_csv(path: Path, header: bool | None) -> tuple[list[dict[str, Any]], list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    rows = [row for row in rows if row]
    if not rows:
        return [], []
    known = {*DEFAULT_PROMPT_COLUMNS, *DEFAULT_QUESTION_COLUMNS, *DEFAULT_LABEL_COLUMNS}
    if header is None:
        header = not (len(rows[0]) == 1 and rows[0][0].strip() not in known)
        if not header:
            logger.info("%s has one column and no known header; reading one prompt per line.", path)
    if not header:
        # One prompt per line: an unquoted comma split a line into fields, so join them back.
        return [{"prompt": ",".join(row)} for row in rows], ["prompt"]
    columns = rows[0]
    return [dict(zip(columns, row)) for row in rows[1:]], columns


def _read_json(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, list):
        return [dict(item) for item in data]
    if isinstance(data, Mapping) and all(isinstance(value, Mapping) for value in data.values()):
        # A dict keyed by id (the PubMedQA layout): keep the key as "id".
        return [{"id": key, **value} for key, value in data.items()]
    raise ValueError(f"{path}: expected a JSON list of objects or an object of objects keyed by id.")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error}).") from error
    return records


def read_records(path: str | Path, *, header: bool | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Read a local CSV, JSON or JSONL file into records.

    Args:
        path: File path with suffix ``.csv``, ``.json`` or ``.jsonl``.
        header: CSV only. ``None`` detects a headerless one-column file (see module docs).

    Returns:
        ``(records, columns)``, where ``columns`` are the CSV header or the keys of the first record.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, header)
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    else:
        raise ValueError(f"Unsupported data file {path}: use one of {', '.join(_FILE_SUFFIXES)}.")
    columns = list(records[0]) if records else []
    return records, columns


def _read_hub(source: str, split: str | None, config_name: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(
            f"Loading {source!r} from the hub needs the 'datasets' package: pip install 'safemerge-callback[eval]'."
        ) from error
    default_config, default_split = HUB_DEFAULTS.get(source, (None, "train"))
    dataset = load_dataset(source, name=config_name or default_config, split=split or default_split)
    return [dict(row) for row in dataset], list(dataset.column_names)


def _is_local(source: str | Path) -> bool:
    path = Path(source).expanduser()
    if path.exists():
        return True
    text = str(source)
    if path.suffix.lower() in _FILE_SUFFIXES or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise ValueError(
            f"Data file {text!r} does not exist; pass an existing CSV/JSON/JSONL file or a hub dataset id."
        )
    return False


def _load_source(
    source: str | Path, split: str | None, config_name: str | None, header: bool | None = None
) -> tuple[list[dict[str, Any]], list[str], str]:
    if _is_local(source):
        path = Path(source).expanduser()
        records, columns = read_records(path, header=header)
        return records, columns, str(path)
    records, columns = _read_hub(str(source), split, config_name)
    return records, columns, str(source)


def select_column(
    columns: Sequence[str], requested: str | None, defaults: Sequence[str], argument: str, source: str
) -> str:
    """Return the column to read: ``requested`` when given, else the first default present.

    Raises:
        ValueError: Naming the missing column, the available columns and the argument to set.
    """
    if requested is not None:
        if requested not in columns:
            raise ValueError(
                f"Column {requested!r} ({argument}) not found in {source}; available columns: {list(columns)}."
            )
        return requested
    for candidate in defaults:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"None of the default columns {list(defaults)} is in {source}; available columns: {list(columns)}. "
        f"Pass {argument}=<column>."
    )


def _apply_limit(records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is None:
        return records
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")
    return records[:limit]


def load_harmful_prompts(
    source: str | Path,
    *,
    prompt_column: str | None = None,
    split: str | None = None,
    config_name: str | None = None,
    header: bool | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load harmful prompts (AdvBench, HEx-PHI-style CSVs, hub datasets).

    Args:
        source: Local CSV/JSON/JSONL file or hub dataset id.
        prompt_column: Column with the prompt; default: first of :data:`DEFAULT_PROMPT_COLUMNS`.
        split: Hub split (default from :data:`HUB_DEFAULTS`, else ``"train"``).
        config_name: Hub dataset config.
        header: CSV header handling; ``None`` detects headerless one-column files.
        limit: Keep the first ``limit`` records.

    Returns:
        Records ``{"id": int, "prompt": str}`` in file order; empty prompts are dropped.
    """
    records, columns, name = _load_source(source, split, config_name, header)
    column = select_column(columns, prompt_column, DEFAULT_PROMPT_COLUMNS, "prompt_column", name)
    prompts = [str(record[column]).strip() for record in records if str(record.get(column) or "").strip()]
    return _apply_limit([{"id": index, "prompt": prompt} for index, prompt in enumerate(prompts)], limit)


def _context_text(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("contexts", "")
    if isinstance(value, (list, tuple)):
        return " ".join(str(part) for part in value)
    return str(value or "")


def _gsm8k_gold(answer: str) -> str:
    marker = answer.rfind("####")
    return (answer[marker + 4 :] if marker >= 0 else answer).strip()


def _load_gsm8k(
    records: list[dict[str, Any]],
    columns: list[str],
    name: str,
    question_column: str | None,
    answer_column: str | None,
) -> list[dict[str, Any]]:
    question = select_column(columns, question_column, DEFAULT_QUESTION_COLUMNS, "question_column", name)
    answer = select_column(columns, answer_column, DEFAULT_GSM8K_ANSWER_COLUMNS, "answer_column", name)
    return [
        {
            "id": index,
            "question": str(record[question]),
            "answer": str(record[answer]),
            "gold": _gsm8k_gold(str(record[answer])),
        }
        for index, record in enumerate(records)
    ]


def _pubmedqa_test_ids(path: Path, split: str | None) -> list[str] | None:
    """Return the PMIDs of the official test split when requested (or by default when available)."""
    labels_path = path.parent / PUBMEDQA_TEST_LABELS_FILE
    if split in (None, "test") and labels_path.exists():
        with labels_path.open(encoding="utf-8") as handle:
            return list(json.load(handle))
    if split == "test":
        raise ValueError(f"split='test' needs {labels_path}; pass split='all' to use every record.")
    if split not in (None, "all"):
        raise ValueError(f"PubMedQA local split must be 'test' or 'all', got {split!r}.")
    return None


def _load_pubmedqa(
    records: list[dict[str, Any]],
    columns: list[str],
    name: str,
    question_column: str | None,
    answer_column: str | None,
    context_column: str | None,
) -> list[dict[str, Any]]:
    question = select_column(columns, question_column, DEFAULT_QUESTION_COLUMNS, "question_column", name)
    answer = select_column(columns, answer_column, DEFAULT_PUBMEDQA_ANSWER_COLUMNS, "answer_column", name)
    context = context_column or next((column for column in DEFAULT_CONTEXT_COLUMNS if column in columns), None)
    if context is not None:
        select_column(columns, context, (), "context_column", name)
    long_answer = next((column for column in DEFAULT_LONG_ANSWER_COLUMNS if column in columns), None)
    loaded = []
    for index, record in enumerate(records):
        gold = str(record[answer]).strip().lower()
        if gold not in ("yes", "no", "maybe"):
            raise ValueError(
                f"{name}: record {record.get('id', index)} has {answer}={record[answer]!r}; expected yes/no/maybe."
            )
        loaded.append(
            {
                "id": record.get("id", record.get("pubid", index)),
                "question": str(record[question]),
                "context": _context_text(record.get(context)) if context else "",
                "long_answer": str(record.get(long_answer) or "") if long_answer else "",
                "gold": gold,
            }
        )
    return loaded


def load_task_set(
    task: str,
    source: str | Path,
    *,
    split: str | None = None,
    config_name: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    context_column: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load a utility task set.

    Args:
        task: ``"gsm8k"`` or ``"pubmedqa"``.
        source: Local file, a PubMedQA folder holding ``ori_pqal.json``, or a hub dataset id.
        split: Hub split; for a local PubMedQA ``ori_pqal.json``, ``"test"`` (the default when
            ``test_ground_truth.json`` is beside it) or ``"all"``.
        config_name: Hub dataset config.
        question_column: Question column (default: first of :data:`DEFAULT_QUESTION_COLUMNS`).
        answer_column: Gold column (GSM8K: ``answer``; PubMedQA: ``final_decision``).
        context_column: PubMedQA context column (default: ``context`` or ``CONTEXTS`` when present).
        limit: Keep the first ``limit`` records.

    Returns:
        Records with a ``gold`` field that ``scorers.score_task`` compares against.
    """
    if task not in ("gsm8k", "pubmedqa"):
        raise ValueError(f"Unknown task {task!r}; available tasks: ['gsm8k', 'pubmedqa'].")
    path = Path(source).expanduser()
    if task == "pubmedqa" and path.is_dir():
        path = path / PUBMEDQA_RECORDS_FILE
        if not path.exists():
            raise ValueError(f"{source} has no {PUBMEDQA_RECORDS_FILE}; pass the PubMedQA data file itself.")
        source = path
    records, columns, name = _load_source(source, split, config_name)
    if task == "gsm8k":
        return _apply_limit(_load_gsm8k(records, columns, name, question_column, answer_column), limit)

    if _is_local(source) and path.suffix.lower() == ".json":
        test_ids = _pubmedqa_test_ids(path, split)
        if test_ids is not None:
            by_id = {str(record["id"]): record for record in records}
            missing = [pmid for pmid in test_ids if pmid not in by_id]
            if missing:
                raise ValueError(f"{name}: {len(missing)} test PMIDs are missing, e.g. {missing[:3]}.")
            records = [by_id[pmid] for pmid in test_ids]
    return _apply_limit(_load_pubmedqa(records, columns, name, question_column, answer_column, context_column), limit)


def load_xstest(
    source: str | Path,
    *,
    prompt_column: str | None = None,
    label_column: str | None = None,
    type_column: str | None = None,
    split: str | None = None,
    config_name: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load XSTest prompts with their safe/unsafe labels.

    Args:
        source: Local file (``xstest_prompts.csv``) or hub dataset id.
        prompt_column: Prompt column (default ``prompt``).
        label_column: Label column with ``safe``/``unsafe`` values (default ``label``).
        type_column: Optional prompt-type column (default ``type`` when present).
        split: Hub split.
        config_name: Hub dataset config.
        limit: Keep ``limit`` records, balanced by label: the first ``ceil(limit / 2)`` safe and the
            first ``floor(limit / 2)`` unsafe prompts (fewer when a label runs out), in file order.
            XSTest groups prompts in blocks of 25 by type, so a plain head would hold one label.

    Returns:
        Records ``{"id", "prompt", "label", "type"}``.
    """
    records, columns, name = _load_source(source, split, config_name)
    prompt = select_column(columns, prompt_column, DEFAULT_PROMPT_COLUMNS, "prompt_column", name)
    label = select_column(columns, label_column, DEFAULT_LABEL_COLUMNS, "label_column", name)
    kind = type_column or next((column for column in DEFAULT_TYPE_COLUMNS if column in columns), None)
    if kind is not None:
        select_column(columns, kind, (), "type_column", name)
    loaded = []
    for index, record in enumerate(records):
        value = str(record[label]).strip().lower()
        if value not in ("safe", "unsafe"):
            raise ValueError(f"{name}: record {index} has {label}={record[label]!r}; expected 'safe' or 'unsafe'.")
        loaded.append(
            {
                "id": record.get("id", index),
                "prompt": str(record[prompt]),
                "label": value,
                "type": str(record.get(kind) or "") if kind else "",
            }
        )
    return balanced_head(loaded, limit)


def balanced_head(records: Sequence[Mapping[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """Keep ``limit`` XSTest records balanced by label, in their original order.

    Takes the first ``ceil(limit / 2)`` ``safe`` and the first ``floor(limit / 2)`` ``unsafe``
    records (fewer when a label runs out). ``None`` keeps every record.
    """
    if limit is None:
        return [dict(record) for record in records]
    _apply_limit([], limit)
    quota = {"safe": (limit + 1) // 2, "unsafe": limit // 2}
    selected = []
    for record in records:
        label = str(record["label"])
        if quota.get(label, 0) > 0:
            quota[label] -= 1
            selected.append(dict(record))
    return selected
