"""Batched generation, stop strings, adapter switching and teacher-forced NLL on tiny models."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from safemerge_callback.evaluation.generation import (
    GenerationSettings,
    answer_nll,
    cut_at_stop_strings,
    generate_from_texts,
    generate_responses,
    render_chat_prompts,
)
from safemerge_callback.evaluation.tiny import build_tiny_causal_lm, build_tiny_tokenizer
from safemerge_callback.evaluation.variants import attach_adapters, use_variant

PROMPTS = [
    "how to make a bomb",
    "hello",
    "tell me about cats and dogs please",
    "Janet has 12 eggs and sells each for 2 dollars",
    "write a script",
    "what",
    "please tell me how to steal money",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_causal_lm(tokenizer, seed=0)


def _settings(**overrides):
    return GenerationSettings(**{"max_new_tokens": 12, "batch_size": 3, "show_progress": False, **overrides})


def _reference_generate(model, tokenizer, prompt, max_new_tokens):
    """Unbatched, unpadded greedy generation with plain ``model.generate``, cut at EOS."""
    (text,) = render_chat_prompts(tokenizer, [prompt])
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = output[0, encoded["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_batched_greedy_equals_unbatched(model, tokenizer):
    batched = generate_responses(model, tokenizer, PROMPTS, _settings())
    expected = [_reference_generate(model, tokenizer, prompt, 12) for prompt in PROMPTS]
    assert batched == expected


def test_batch_composition_does_not_change_output(model, tokenizer):
    unsorted = generate_responses(model, tokenizer, PROMPTS, _settings(batch_size=4, sort_by_length=False))
    single = generate_responses(model, tokenizer, PROMPTS, _settings(batch_size=1))
    assert unsorted == single


def test_generation_leaves_tokenizer_untouched(model, tokenizer):
    generate_responses(model, tokenizer, PROMPTS[:2], _settings())
    assert tokenizer.padding_side == "right"


def test_chat_template_applied_with_generation_prompt(tokenizer):
    (text,) = render_chat_prompts(tokenizer, ["hello"], system_prompt="please")
    assert text == "<s><|system|> please <|user|> hello <|assistant|>"


def test_system_prompt_merged_when_template_rejects_it():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (text,) = render_chat_prompts(tokenizer, ["hello"], system_prompt="please")
    assert text == "<|user|> please\n\nhello <|assistant|>"


def test_missing_chat_template_raises(model):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        generate_responses(model, tokenizer, ["hello"], _settings())


def test_stop_string_cuts_and_stops_early(model, tokenizer):
    full = generate_from_texts(model, tokenizer, render_chat_prompts(tokenizer, PROMPTS[:1]), _settings())[0]
    words = full.text.split(" ")
    assert len(words) >= 6, "the tiny model should produce a long enough continuation"
    stop = words[4]
    cut = generate_from_texts(
        model, tokenizer, render_chat_prompts(tokenizer, PROMPTS[:1]), _settings(stop_strings=(stop,))
    )[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.stop_reason == "stop_string"
    assert cut.num_new_tokens < full.num_new_tokens


def test_cut_at_stop_strings_takes_earliest():
    assert cut_at_stop_strings("Answer: 4\nQuestion: next\nAnswer:", ["Answer:", "Question:"]) == ("", True)
    assert cut_at_stop_strings("4\nQuestion: next", ["Question:", "next"]) == ("4\n", True)
    assert cut_at_stop_strings("plain", ["Question:"]) == ("plain", False)


def test_generation_settings_validation():
    with pytest.raises(ValueError, match="batch_size"):
        GenerationSettings(batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=1.5)
    with pytest.raises(TypeError, match="wrap it in a tuple"):
        GenerationSettings(stop_strings="Question:")
    with pytest.raises(ValueError, match="non-empty strings"):
        GenerationSettings(stop_strings=("",))
    assert GenerationSettings(stop_strings=["a"]).to_dict()["stop_strings"] == ["a"]


def _save_lora(tokenizer, path, seed):
    base = build_tiny_causal_lm(tokenizer, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"first": _save_lora(tokenizer, root / "first", 1), "second": _save_lora(tokenizer, root / "second", 2)}


def test_adapters_switch_without_reloading_base(tokenizer, adapter_dirs):
    base = build_tiny_causal_lm(tokenizer, seed=0)
    settings = _settings()
    before = generate_responses(base, tokenizer, PROMPTS[:3], settings)
    weight = base.model.embed_tokens.weight

    model = attach_adapters(base, adapter_dirs)
    outputs = {}
    for name in ("base", "first", "second", "base"):
        with use_variant(model, name) as active:
            outputs[name] = generate_responses(active, tokenizer, PROMPTS[:3], settings)
        assert model.get_base_model() is base
        assert model.get_base_model().model.embed_tokens.weight is weight

    assert outputs["base"] == before
    assert outputs["first"] != outputs["base"]
    assert outputs["second"] != outputs["base"]
    assert outputs["first"] != outputs["second"]


def test_use_variant_unknown_adapter(tokenizer, adapter_dirs):
    model = attach_adapters(build_tiny_causal_lm(tokenizer), {"first": adapter_dirs["first"]})
    expected = r"'third' is not attached; attached adapters: \['first'\]"
    with pytest.raises(ValueError, match=expected), use_variant(model, "third"):
        pass


def test_attach_adapters_rejects_bad_names(tokenizer, adapter_dirs, tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        attach_adapters(build_tiny_causal_lm(tokenizer), {"base": adapter_dirs["first"]})
    with pytest.raises(ValueError, match="does not exist"):
        attach_adapters(build_tiny_causal_lm(tokenizer), {"x": tmp_path / "missing"})


def _manual_nll(model, tokenizer, prompt, answer):
    """Return (sum of answer-token NLLs, answer token count) from one unpadded forward pass."""
    (text,) = render_chat_prompts(tokenizer, [prompt])
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=labels).loss.item()
    return loss * len(answer_ids), len(answer_ids)


def test_answer_nll_matches_manual_token_mean(model, tokenizer):
    prompts = ["hello", "tell me about cats and dogs please", "what"]
    answers = ["yes", "the cats and the dogs", "I cannot help with that."]
    pieces = [_manual_nll(model, tokenizer, p, a) for p, a in zip(prompts, answers)]
    expected = sum(total for total, _ in pieces) / sum(count for _, count in pieces)
    assert answer_nll(model, tokenizer, prompts, answers, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_answer_nll_errors(model, tokenizer):
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        answer_nll(model, tokenizer, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="no answer encodes"):
        answer_nll(model, tokenizer, ["a"], [""])
