"""Data of the demo: a seeded built-in set made from templates, or real sets read from a data folder.

Every split is a list of `Example` (prompt, response, category). Harmful evaluation prompts never appear in the
alignment or safety-adapter data: the built-in set splits by request frame, a data folder by row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import templates


ANSWER_MARKER = "####"


@dataclass(frozen=True)
class Example:
    """One chat turn pair.

    Attributes:
        prompt (`str`): the user message.
        response (`str`): the reference assistant reply. It is empty for prompts that are only evaluated, and for
            benign alignment prompts, whose replies the base model writes.
        category (`str`): harm category, benign topic or task name.
    """

    prompt: str
    response: str = ""
    category: str = ""


@dataclass(frozen=True)
class DataSizes:
    """How many examples each split takes (the pools are larger; a seeded sample is drawn).

    Attributes:
        align_harmful / align_benign: harmful → refusal and benign pairs of the alignment stage.
        safety: harmful → refusal pairs of the safety adapter.
        task_train / task_eval: arithmetic problems for fine-tuning and for utility.
        eval_harmful / eval_benign: held-out harmful prompts (refusal rate) and benign prompts (over-refusal).
        validation_harmful / validation_benign / task_validation: a second held-out set, disjoint from training
            and evaluation, for choosing settings (τ, weights) without looking at the evaluation prompts. Only a
            data folder fills these; the default 0 leaves them empty.
    """

    align_harmful: int = 128
    align_benign: int = 208
    safety: int = 120
    task_train: int = 800
    task_eval: int = 32
    eval_harmful: int = 64
    eval_benign: int = 40
    validation_harmful: int = 0
    validation_benign: int = 0
    task_validation: int = 0


@dataclass
class DemoData:
    """All splits of one demo run, plus where they came from."""

    source: str
    align_harmful: list[Example] = field(default_factory=list)
    align_benign: list[Example] = field(default_factory=list)
    safety: list[Example] = field(default_factory=list)
    task_train: list[Example] = field(default_factory=list)
    task_eval: list[Example] = field(default_factory=list)
    eval_harmful: list[Example] = field(default_factory=list)
    eval_benign: list[Example] = field(default_factory=list)
    validation_harmful: list[Example] = field(default_factory=list)
    validation_benign: list[Example] = field(default_factory=list)
    task_validation: list[Example] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Return the SHA-256 of the data's canonical JSON, so stages rerun when any example changes."""
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_builtin_data(sizes: DataSizes, seed: int = 0) -> DemoData:
    """Generate the built-in data set from the templates with a seeded random generator.

    Args:
        sizes: how many examples per split; a split takes at most its pool (e.g. 240 alignment harmful prompts).
        seed: seed of every random choice (objects, refusal wordings, numbers, sampling).

    Returns:
        `DemoData` with `source="builtin"`; the benign alignment answers are empty (the base model writes them).
    """
    rng = random.Random(seed)
    data = DemoData(source="builtin")
    data.align_harmful = _sample(rng, _harmful_pool(templates.ALIGNMENT_FRAMES, templates.ALIGNMENT_REFUSALS, rng),
                                 sizes.align_harmful)
    data.safety = _sample(rng, _harmful_pool(templates.SAFETY_FRAMES, templates.SAFETY_REFUSALS, rng), sizes.safety)
    data.eval_harmful = _sample(rng, _harmful_pool(templates.EVALUATION_FRAMES, None, rng), sizes.eval_harmful)
    training_lookalikes = [Example(prompt, "", "lookalike") for prompt in templates.LOOKALIKE_TRAINING_PROMPTS]
    data.align_benign = _sample(rng, training_lookalikes + _benign_pool(templates.BENIGN_ALIGNMENT_FRAMES),
                                sizes.align_benign)
    lookalikes = [Example(prompt, "", "lookalike") for prompt in templates.LOOKALIKE_PROMPTS]
    data.eval_benign = _sample(rng, lookalikes + _benign_pool(templates.BENIGN_EVALUATION_FRAMES), sizes.eval_benign)
    data.task_train, data.task_eval = arithmetic_splits(sizes.task_train, sizes.task_eval, seed)
    return data


def templated_safety_examples(seed: int = 0) -> list[Example]:
    """Return every templated harmful request of the alignment and safety frames, each with a safety-adapter refusal.

    The evaluation frames are left out. With a data folder, the alignment and evaluation stages use AdvBench, so
    these requests add wordings and topics that neither of them contains.
    """
    rng = random.Random(f"safety-{seed}")
    return _harmful_pool(templates.ALIGNMENT_FRAMES + templates.SAFETY_FRAMES, templates.SAFETY_REFUSALS, rng)


def _harmful_pool(frames: tuple[int, ...], refusals: list[str] | None, rng: random.Random) -> list[Example]:
    pool = []
    for category, spec in templates.HARMFUL_CATEGORIES.items():
        for index in frames:
            for obj in spec["objects"]:
                response = ""
                if refusals is not None:
                    response = rng.choice(refusals)
                    if category == "self_harm":
                        response += templates.SELF_HARM_SUFFIX
                pool.append(Example(spec["frames"][index].format(x=obj), response, category))
    return pool


def _benign_pool(frames: tuple[int, ...]) -> list[Example]:
    return [Example(spec["frames"][index].format(x=obj), "", topic)
            for topic, spec in templates.BENIGN_TOPICS.items() for index in frames for obj in spec["objects"]]


def _sample(rng: random.Random, pool: list[Example], count: int) -> list[Example]:
    if count < 0:
        raise ValueError(f"DataSizes entries must be >= 0, got {count}.")
    return rng.sample(pool, min(count, len(pool)))


# Arithmetic word problems: each maker returns (question, worked answer without the final line, result).

def _add(rng, p, q, item):
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    return (f"{p} has {a} {item}. {q} gives {p} {b} more. How many {item} does {p} have now?",
            f"{p} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}.", a + b)


def _subtract(rng, p, q, item):
    a = rng.randint(20, 90)
    b = rng.randint(2, a - 1)
    return (f"{p} had {a} {item} and gave {b} of them to {q}. How many {item} does {p} have left?",
            f"{p} gave away {b} of {a} {item}, so {a} - {b} = {a - b}.", a - b)


def _multiply(rng, p, q, item):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return (f"{p} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {p} buy?",
            f"There are {a} boxes with {b} {item} each, so {a} * {b} = {a * b}.", a * b)


def _divide(rng, p, q, item):
    b, k = rng.randint(2, 9), rng.randint(2, 12)
    return (f"{p} shares {b * k} {item} equally among {b} friends. How many {item} does each friend get?",
            f"{b * k} {item} split among {b} friends is {b * k} / {b} = {k}.", k)


def _two_step(rng, p, q, item):
    a, b, c = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 10)
    return (f"{p} has {a} {item} and buys {b} packs with {c} {item} in each pack. How many {item} does {p} have now?",
            f"The packs hold {b} * {c} = {b * c} {item}. Together {a} + {b * c} = {a + b * c}.", a + b * c)


def _change(rng, p, q, item):
    a, c = rng.randint(2, 6), rng.randint(2, 9)
    d = next(bill for bill in (10, 20, 50, 100) if bill > a * c)
    return (f"{p} buys {a} notebooks that cost ${c} each and pays with a ${d} bill. How much change does {p} get?",
            f"The notebooks cost {a} * {c} = {a * c} dollars. The change is {d} - {a * c} = {d - a * c}.",
            d - a * c)


def _give_each(rng, p, q, item):
    b, c = rng.randint(2, 6), rng.randint(2, 8)
    a = b * c + rng.randint(1, 30)
    return (f"{p} has {a} {item} and gives {c} {item} to each of {b} friends. How many {item} are left?",
            f"{p} gives away {b} * {c} = {b * c} {item}. Then {a} - {b * c} = {a - b * c}.", a - b * c)


def _pages(rng, p, q, item):
    a, b, c = rng.randint(5, 30), rng.randint(2, 7), rng.randint(3, 40)
    return (f"{p} reads {a} pages a day for {b} days and then {c} more pages. How many pages does {p} read in all?",
            f"In {b} days {p} reads {a} * {b} = {a * b} pages. Adding {c} gives {a * b} + {c} = {a * b + c}.",
            a * b + c)


ARITHMETIC_MAKERS = (_add, _subtract, _multiply, _divide, _two_step, _change, _give_each, _pages)


def arithmetic_problem(rng: random.Random) -> Example:
    """Draw one arithmetic word problem whose answer ends in `#### N` (N a non-negative integer)."""
    maker = rng.choice(ARITHMETIC_MAKERS)
    person, other = rng.sample(templates.PEOPLE, 2)
    question, work, result = maker(rng, person, other, rng.choice(templates.ITEMS))
    return Example(question, f"{work}\n{ANSWER_MARKER} {result}", maker.__name__.strip("_"))


def arithmetic_splits(train: int, evaluation: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Return `train` training and `evaluation` held-out problems; no question appears in both."""
    rng = random.Random(f"arithmetic-{seed}")
    seen: set[str] = set()
    problems: list[Example] = []
    attempts = 0
    while len(problems) < train + evaluation:
        attempts += 1
        if attempts > 50 * (train + evaluation) + 100:
            raise ValueError(f"Could not draw {train + evaluation} distinct arithmetic problems; ask for fewer.")
        problem = arithmetic_problem(rng)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems[:train], problems[train:]


def load_data_dir(data_dir: str | Path, sizes: DataSizes, seed: int = 0) -> DemoData:
    """Read real sets from `data_dir`: AdvBench, GSM8K and XSTest, in the folder layout below.

    Layout: `advbench/harmful_behaviors.csv` (column `goal`), `gsm8k/train.jsonl` and `gsm8k/test.jsonl`
    (`question`, `answer`), `xstest/xstest_prompts.csv` (`prompt`, `label`). AdvBench goals are shuffled with
    `seed` and split by row: the first half trains the alignment stage, the next fifth the safety adapter, the last
    30% is held out for evaluation. Refusal wordings and benign alignment prompts come from the built-in templates.
    The validation splits take the first-half goals that the alignment sample left out, and the XSTest and GSM8K
    test rows that the evaluation splits left out. They are drawn last, so asking for them changes no other split.

    Raises:
        ValueError: when a file or column is missing.
    """
    data_dir = Path(data_dir)
    rng = random.Random(seed)
    goals = [row["goal"].strip() for row in _read_csv(data_dir / "advbench" / "harmful_behaviors.csv", "goal")]
    rng.shuffle(goals)
    first, second = len(goals) // 2, len(goals) * 7 // 10
    builtin = build_builtin_data(sizes, seed)
    data = DemoData(source=f"data-dir:{data_dir}")
    data.align_harmful = _sample(rng, [Example(g, rng.choice(templates.ALIGNMENT_REFUSALS), "advbench")
                                       for g in goals[:first]], sizes.align_harmful)
    data.safety = _sample(rng, [Example(g, rng.choice(templates.SAFETY_REFUSALS), "advbench")
                                for g in goals[first:second]], sizes.safety)
    data.eval_harmful = _sample(rng, [Example(g, "", "advbench") for g in goals[second:]], sizes.eval_harmful)
    data.align_benign = builtin.align_benign
    xstest = _read_csv(data_dir / "xstest" / "xstest_prompts.csv", "prompt", "label")
    xstest_safe = [Example(row["prompt"], "", f"xstest:{row.get('type', '')}")
                   for row in xstest if row["label"] == "safe"]
    data.eval_benign = _sample(rng, xstest_safe, sizes.eval_benign)
    data.task_train = _sample(rng, _read_gsm8k(data_dir / "gsm8k" / "train.jsonl"), sizes.task_train)
    gsm8k_test = _read_gsm8k(data_dir / "gsm8k" / "test.jsonl")
    data.task_eval = _sample(rng, gsm8k_test, sizes.task_eval)

    data.validation_harmful = _sample(rng, _unused([Example(g, "", "advbench") for g in goals[:first]],
                                                   data.align_harmful), sizes.validation_harmful)
    data.validation_benign = _sample(rng, _unused(xstest_safe, data.eval_benign), sizes.validation_benign)
    data.task_validation = _sample(rng, _unused(gsm8k_test, data.task_eval), sizes.task_validation)
    return data


def _unused(pool: list[Example], used: list[Example]) -> list[Example]:
    """Return the examples of `pool` whose prompt is not in `used`, in pool order."""
    used_prompts = {e.prompt for e in used}
    return [e for e in pool if e.prompt not in used_prompts]


def _read_csv(path: Path, *columns: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"--data-dir: missing file {str(path)!r}; the folder needs advbench/, gsm8k/ and xstest/.")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"--data-dir: {str(path)!r} needs the column(s) {list(columns)}; it has "
                         f"{list(rows[0]) if rows else 'no rows'}.")
    return rows


def _read_gsm8k(path: Path) -> list[Example]:
    if not path.is_file():
        raise ValueError(f"--data-dir: missing file {str(path)!r}; the folder needs gsm8k/train.jsonl and test.jsonl.")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                # Calculator annotations (<<48/2=24>>) are training aids, not part of a readable answer.
                answer = re.sub(r"<<[^<>]*>>", "", record["answer"])
                examples.append(Example(record["question"], answer, "gsm8k"))
    return examples


def check_disjoint(data: DemoData) -> None:
    """Raise a `ValueError` if a held-out prompt also appears in training data, or a validation prompt in evaluation.

    Evaluation and validation prompts must not appear in the alignment, safety or task-training data, and
    validation prompts (used to choose settings) must not appear in the evaluation splits either.
    """
    evaluation = ("eval_harmful", "eval_benign", "task_eval")
    validation = ("validation_harmful", "validation_benign", "task_validation")
    trained = {e.prompt for split in (data.align_harmful, data.align_benign, data.safety, data.task_train)
               for e in split}
    evaluated = {e.prompt for name in evaluation for e in getattr(data, name)}
    for name in evaluation + validation:
        overlap = sorted(trained & {e.prompt for e in getattr(data, name)})
        if overlap:
            raise ValueError(f"{len(overlap)} prompt(s) of {name} also appear in training data, e.g. {overlap[0]!r}; "
                             "evaluation must use held-out prompts.")
    for name in validation:
        overlap = sorted(evaluated & {e.prompt for e in getattr(data, name)})
        if overlap:
            raise ValueError(f"{len(overlap)} prompt(s) of {name} also appear in the evaluation splits, e.g. "
                             f"{overlap[0]!r}; settings must be chosen on prompts the evaluation does not use.")
