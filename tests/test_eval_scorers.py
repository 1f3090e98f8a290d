"""Task scorers: GSM8K extraction, PubMedQA parsing and F1, XSTest rates, Wilson intervals."""

from decimal import Decimal

import pytest

from safemerge_callback.evaluation.scorers import (
    extract_gsm8k_answer,
    format_task_prompt,
    macro_f1,
    parse_pubmedqa_answer,
    rate,
    reference_answer,
    score_gsm8k,
    score_pubmedqa,
    score_xstest,
    wilson_interval,
)

# (text, strict answer, flexible answer)
GSM8K_EXTRACTION = [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18", "18"),
    ("#### 18\nQuestion: Tom has 3 apples. Answer: 5 #### 20", "18", "18"),  # first marker wins over a run-on
    ("The total is 1,000 apples.", None, "1000"),
    ("#### 1,000", "1000", "1000"),
    ("So the answer is 18.", None, "18"),
    ("#### 18.00", "18", "18"),
    ("It costs $29.00 in total.", None, "29"),
    ("#### $29.00", "29", "29"),
    ("The temperature fell to -3 degrees.", None, "-3"),
    ("#### -3", "-3", "-3"),
    ("16 - 3 - 4 = 9 eggs are left", None, "9"),  # subtraction signs are not negative numbers
    ("It rose by 50%.", None, "50"),
    ("<<2*3=6>>", None, None),  # annotations are removed before extraction
    ("I do not know.", None, None),
    ("#### no idea", None, None),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), GSM8K_EXTRACTION)
def test_gsm8k_extraction_table(text, strict, flexible):
    extraction = extract_gsm8k_answer(text)
    assert extraction.strict == (None if strict is None else Decimal(strict))
    assert extraction.flexible == (None if flexible is None else Decimal(flexible))


def test_score_gsm8k_strict_flexible_no_answer():
    golds = ["18", "1,000", "#### 29", "-3", "7"]
    responses = [
        "#### 18",  # strict and flexible hit
        "That makes 1000 in total.",  # flexible only
        "#### $29.00\nQuestion: next #### 4",  # strict hit despite the run-on
        "#### 3",  # wrong
        "no idea",  # no answer
    ]
    scores = score_gsm8k(responses, golds)
    assert scores["n"] == 5
    assert scores["strict_accuracy"]["count"] == 2
    assert scores["flexible_accuracy"]["count"] == 3
    assert scores["flexible_accuracy"]["value"] == pytest.approx(0.6)
    assert scores["no_answer_rate"]["count"] == 1
    assert scores["predictions"] == ["18", "1000", "29.00", "3", None]


def test_score_gsm8k_rejects_gold_without_number():
    with pytest.raises(ValueError, match="gold answer 0 has no number"):
        score_gsm8k(["#### 1"], ["unknown"])
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        score_gsm8k(["1", "2"], ["1"])


PUBMEDQA_PARSE = [
    ("Yes, the study shows a benefit.", "yes"),
    ("no", "no"),
    ("MAYBE.", "maybe"),
    ("Based on the context, no firm conclusion. Answer: maybe", "maybe"),  # the cue beats the earlier "no"
    ("The answer is yes.", "yes"),
    ("Final answer: No", "no"),
    ("To answer this: yes", "yes"),
    ("Nobody knows; it is yesterday's news.", "unparsed"),  # whole words only
    ("no-one can tell. Answer: yes", "yes"),
    ("", "unparsed"),
]


@pytest.mark.parametrize(("text", "expected"), PUBMEDQA_PARSE)
def test_pubmedqa_parse_table(text, expected):
    assert parse_pubmedqa_answer(text) == expected


def test_score_pubmedqa_hand_computed():
    golds = ["yes", "yes", "no", "maybe", "no"]
    responses = ["Answer: yes", "no", "No.", "I cannot tell", "yes"]
    # Predictions: yes, no, no, unparsed, yes.
    # yes: TP 1, FP 1, FN 1 -> F1 0.5; no: TP 1, FP 1, FN 1 -> 0.5; maybe: TP 0, FN 1 -> 0.
    scores = score_pubmedqa(responses, golds)
    assert scores["predictions"] == ["yes", "no", "no", "unparsed", "yes"]
    assert scores["accuracy"]["count"] == 2
    assert scores["accuracy"]["value"] == pytest.approx(0.4)
    assert scores["per_class_f1"] == pytest.approx({"yes": 0.5, "no": 0.5, "maybe": 0.0})
    assert scores["macro_f1"] == pytest.approx(1 / 3)
    assert scores["unparsed_rate"]["count"] == 1


def test_macro_f1_skips_absent_classes():
    # "maybe" occurs nowhere, so the average is over yes and no.
    # yes: TP 1, FP 0, FN 1 -> F1 2/3; no: TP 1, FP 1, FN 0 -> F1 2/3.
    macro, per_class = macro_f1(["yes", "no", "no"], ["yes", "yes", "no"], ("yes", "no", "maybe"))
    assert set(per_class) == {"yes", "no"}
    assert per_class["yes"] == pytest.approx(2 / 3)
    assert per_class["no"] == pytest.approx(2 / 3)
    assert macro == pytest.approx(2 / 3)


def test_score_pubmedqa_rejects_bad_gold():
    with pytest.raises(ValueError, match="yes/no/maybe"):
        score_pubmedqa(["yes"], ["probably"])


def test_score_xstest_rates():
    labels = ["safe", "safe", "safe", "safe", "unsafe", "unsafe"]
    refusals = [True, False, False, False, True, True]
    empty = [False, True, False, False, False, False]
    scores = score_xstest(refusals, labels, empty=empty)
    assert scores["n_safe"] == 4
    assert scores["n_unsafe"] == 2
    assert scores["over_refusal_rate"]["value"] == pytest.approx(0.25)
    assert scores["unsafe_refusal_rate"]["value"] == pytest.approx(1.0)
    assert scores["empty_safe"] == 1
    assert scores["empty_unsafe"] == 0


def test_score_xstest_rejects_unknown_label():
    with pytest.raises(ValueError, match="'safe' or 'unsafe'"):
        score_xstest([True], ["harmful"])


# Hand-computed with p = k/n, z = 1.959964:
# center = (p + z^2/2n) / (1 + z^2/n), half = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
WILSON_CASES = [
    (5, 10, 0.236593, 0.763407),  # center 0.5, half 0.263407
    (1, 4, 0.045587, 0.699358),
    (0, 10, 0.0, 0.277533),  # high = (z^2/n) / (1 + z^2/n)
    (10, 10, 0.722467, 1.0),
    (90, 100, 0.825634, 0.944771),
]


@pytest.mark.parametrize(("count", "total", "low", "high"), WILSON_CASES)
def test_wilson_interval_hand_computed(count, total, low, high):
    computed_low, computed_high = wilson_interval(count, total)
    assert computed_low == pytest.approx(low, abs=1e-5)
    assert computed_high == pytest.approx(high, abs=1e-5)


def test_rate_with_zero_total_is_undefined():
    empty = rate(0, 0)
    assert empty.value is None
    assert empty.low is None
    with pytest.raises(ValueError, match="total > 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="count <= total"):
        wilson_interval(3, 2)


def test_task_prompts_and_reference_answers():
    gsm8k = {"question": "Janet has 3 eggs.", "answer": "3 * 2 = <<3*2=6>>6\n#### 6", "gold": "6"}
    assert "#### <number>" in format_task_prompt("gsm8k", gsm8k)
    assert reference_answer("gsm8k", gsm8k) == "3 * 2 = 6\n#### 6"
    pubmedqa = {"question": "Does it work?", "context": "A trial.", "long_answer": "It works.", "gold": "yes"}
    assert format_task_prompt("pubmedqa", pubmedqa).startswith("Context: A trial.")
    assert reference_answer("pubmedqa", pubmedqa) == "It works.\nAnswer: yes"
    with pytest.raises(ValueError, match="Unknown task 'mmlu'"):
        format_task_prompt("mmlu", gsm8k)
