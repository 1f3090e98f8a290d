"""Batched chat generation and teacher-forced answer NLL for evaluation.

The functions take any causal LM, including a ``PeftModel`` whose variant was selected with
:func:`safemerge_callback.evaluation.variants.use_variant`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by every variant of one evaluation.

    Attributes:
        max_new_tokens: Maximum number of generated tokens per response, at least 1.
        batch_size: Number of prompts per ``generate`` call, at least 1.
        do_sample: Sample instead of greedy decoding. Greedy (the default) makes runs repeatable.
        temperature: Sampling temperature, > 0; used only when ``do_sample`` is true.
        top_p: Nucleus sampling mass in (0, 1]; used only when ``do_sample`` is true.
        seed: Seed passed to ``torch.manual_seed`` before sampling; ``None`` leaves the RNG alone.
        system_prompt: Optional system turn put before every user prompt.
        stop_strings: Each response is cut before the first occurrence of any of these strings, and a
            row stops generating once one appears (for example ``"Question:"`` run-ons).
        sort_by_length: Group prompts of similar token length into the same batch to reduce padding.
            Outputs are returned in input order either way.
        show_progress: Show a tqdm progress bar over batches.
    """

    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    system_prompt: str | None = None
    stop_strings: tuple[str, ...] = ()
    sort_by_length: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationSettings.{name} must be an integer >= 1, got {value!r}.")
        if not self.temperature > 0:
            raise ValueError(f"GenerationSettings.temperature must be > 0, got {self.temperature!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationSettings.top_p must be in (0, 1], got {self.top_p!r}.")
        if isinstance(self.stop_strings, str):
            raise TypeError(
                f"GenerationSettings.stop_strings must be a sequence of strings, got the string {self.stop_strings!r}; "
                "wrap it in a tuple."
            )
        stops = tuple(self.stop_strings)
        if any(not isinstance(stop, str) or not stop for stop in stops):
            raise ValueError(f"GenerationSettings.stop_strings must contain non-empty strings, got {stops!r}.")
        object.__setattr__(self, "stop_strings", stops)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict (for result provenance)."""
        settings = dataclasses.asdict(self)
        settings["stop_strings"] = list(self.stop_strings)
        return settings


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated response.

    Attributes:
        text: Decoded continuation without special tokens, cut before the first stop string.
        num_new_tokens: Tokens generated before the end-of-sequence token (or the length limit).
        stop_reason: ``"eos"``, ``"stop_string"`` or ``"max_new_tokens"``.
    """

    text: str
    num_new_tokens: int
    stop_reason: str


def apply_chat_template_text(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """Render ``messages`` with the tokenizer's chat template and return the text.

    Args:
        tokenizer: A Hugging Face tokenizer with a ``chat_template``.
        messages: Conversation as ``{"role": ..., "content": ...}`` dicts.
        add_generation_prompt: Append the template's opening of an assistant turn.

    Returns:
        The rendered prompt. It usually contains the BOS token already, so encode it with
        ``add_special_tokens=False``.

    Raises:
        ValueError: If the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat_template; evaluation prompts are rendered as chat turns. "
            "Load the tokenizer of the chat (instruct) model, or set tokenizer.chat_template to a Jinja template."
        )
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str.")
    return text


def render_chat_prompts(tokenizer: Any, prompts: Sequence[str], system_prompt: str | None = None) -> list[str]:
    """Render each user prompt as a one-turn chat, with an optional system turn, ready for generation.

    Templates that reject the system role (Gemma's, for example) get the system prompt prepended to
    the user turn instead, with a warning.
    """
    import jinja2

    rendered = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is None:
            rendered.append(apply_chat_template_text(tokenizer, messages))
            continue
        try:
            rendered.append(
                apply_chat_template_text(tokenizer, [{"role": "system", "content": system_prompt}, *messages])
            )
        except jinja2.TemplateError as error:
            if not rendered:
                logger.warning("Chat template rejected the system turn (%s); prepending it to the user turn.", error)
            merged = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
            rendered.append(apply_chat_template_text(tokenizer, merged))
    return rendered


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop string.

    Returns:
        The (possibly shortened) text and whether a stop string was found.
    """
    positions = [index for index in (text.find(stop) for stop in stop_strings) if index >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


class _StopStringCriteria(StoppingCriteria):
    """Per-row stop once the decoded tail of the generated tokens contains a stop string.

    Only the last few tokens are decoded each step, so the cost does not grow with the response
    length. The window is long enough for any stop string because every token that can end up in
    decoded text contributes at least one character. The authoritative cut is made on the full text.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.prompt_length = prompt_length
        self.window = max(len(stop) for stop in self.stop_strings) + 8

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [any(stop in tail for stop in self.stop_strings) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(token) for token in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _pad_token_id(model: Any, tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None)):
        if candidate is not None:
            return int(candidate)
    eos = sorted(_eos_token_ids(model, tokenizer))
    if not eos:
        raise ValueError("The tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token.")
    return eos[0]


def _pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into ``input_ids`` and ``attention_mask`` tensors of shape ``[batch, max_len]``."""
    length = max(len(tokens) for tokens in token_lists)
    input_ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), length), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        span = slice(length - len(tokens), length) if side == "left" else slice(0, len(tokens))
        input_ids[row, span] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _generation_config(model: Any, settings: GenerationSettings, pad_id: int) -> Any:
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = settings.max_new_tokens
    config.max_length = None
    config.pad_token_id = pad_id
    config.do_sample = settings.do_sample
    if settings.do_sample:
        config.temperature = settings.temperature
        config.top_p = settings.top_p
    else:
        # Chat checkpoints often ship sampling defaults; clearing them keeps greedy decoding warning-free.
        config.temperature = None
        config.top_p = None
        config.top_k = None
    return config


def _batches(order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start : start + batch_size])


@torch.inference_mode()
def generate_from_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    desc: str = "generate",
) -> list[Generation]:
    """Generate a continuation for each already rendered prompt text.

    Prompts are encoded without extra special tokens (chat templates add their own), left-padded and
    decoded in batches of ``settings.batch_size``.

    Args:
        model: A causal LM (or a ``PeftModel`` around one) with ``generate``.
        tokenizer: The model's tokenizer. It is not modified; padding is done here.
        texts: Rendered prompts, for example from :func:`render_chat_prompts`.
        settings: Decoding settings; defaults to greedy with 256 new tokens.
        desc: Label of the progress bar.

    Returns:
        One :class:`Generation` per text, in input order.
    """
    settings = settings or GenerationSettings()
    if not texts:
        return []
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)

    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    empty = [index for index, tokens in enumerate(encoded) if not tokens]
    if empty:
        raise ValueError(f"Prompts at positions {empty[:5]} encode to zero tokens; remove them or fix the template.")
    order = list(range(len(texts)))
    if settings.sort_by_length:
        order.sort(key=lambda index: -len(encoded[index]))

    pad_id = _pad_token_id(model, tokenizer)
    eos_ids = _eos_token_ids(model, tokenizer)
    config = _generation_config(model, settings, pad_id)
    device = _model_device(model)
    results: list[Generation | None] = [None] * len(texts)
    batches = list(_batches(order, settings.batch_size))
    for batch in tqdm(batches, desc=desc, disable=not settings.show_progress, leave=False):
        input_ids, attention_mask = _pad_batch([encoded[index] for index in batch], pad_id, side="left")
        criteria = StoppingCriteriaList()
        if settings.stop_strings:
            criteria.append(_StopStringCriteria(tokenizer, settings.stop_strings, input_ids.shape[1]))
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            stopping_criteria=criteria,
        )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        for index, tokens in zip(batch, new_tokens):
            results[index] = _finish_generation(tokenizer, tokens, eos_ids, settings.stop_strings)
    return [result for result in results if result is not None]


def _finish_generation(
    tokenizer: Any, tokens: list[int], eos_ids: set[int], stop_strings: Sequence[str]
) -> Generation:
    eos_position = next((position for position, token in enumerate(tokens) if token in eos_ids), None)
    if eos_position is not None:
        tokens = tokens[:eos_position]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    text, stopped = cut_at_stop_strings(text, stop_strings)
    if stopped:
        reason = "stop_string"
    elif eos_position is not None:
        reason = "eos"
    else:
        reason = "max_new_tokens"
    return Generation(text=text, num_new_tokens=len(tokens), stop_reason=reason)


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    desc: str = "generate",
) -> list[str]:
    """Generate one chat response per user prompt.

    Each prompt becomes a user turn (after ``settings.system_prompt`` when set), rendered with the
    tokenizer's chat template and ``add_generation_prompt=True``.

    Args:
        model: A causal LM or a ``PeftModel``; select the variant first with :func:`use_variant`.
        tokenizer: The model's tokenizer, with a chat template.
        prompts: User messages.
        settings: Decoding settings; defaults to greedy with 256 new tokens.
        desc: Label of the progress bar.

    Returns:
        Response texts in input order, cut before the first stop string.
    """
    settings = settings or GenerationSettings()
    texts = render_chat_prompts(tokenizer, prompts, settings.system_prompt)
    return [generation.text for generation in generate_from_texts(model, tokenizer, texts, settings, desc=desc)]


def _encode_answer_pairs(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], system_prompt: str | None
) -> list[tuple[list[int], list[int]]]:
    """Encode (chat prompt, answer) pairs separately so the answer tokens are known exactly."""
    rendered = render_chat_prompts(tokenizer, prompts, system_prompt)
    pairs = []
    for text, answer in zip(rendered, answers):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if answer_ids:
            pairs.append((prompt_ids, answer_ids))
    if not pairs:
        raise ValueError("answer_nll: no answer encodes to any token; pass non-empty reference answers.")
    return pairs


@torch.inference_mode()
def answer_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    system_prompt: str | None = None,
    batch_size: int = 8,
) -> float:
    """Compute the mean per-token negative log-likelihood of reference answers (teacher forcing).

    Each prompt is rendered as a chat turn with the generation prompt, the answer tokens are
    appended, and only the answer tokens are scored. The mean is over all answer tokens of all pairs,
    so long answers weigh more. It is a utility measure that still moves when a tiny model's task
    accuracy sits at zero.

    Args:
        model: A causal LM or a ``PeftModel`` (the active variant is used).
        tokenizer: The model's tokenizer, with a chat template.
        prompts: User messages, one per answer.
        answers: Reference answers. Answers that encode to no tokens are skipped.
        system_prompt: Optional system turn.
        batch_size: Pairs per forward pass, at least 1.

    Returns:
        Mean NLL in nats per answer token, >= 0.

    Raises:
        ValueError: If the lengths differ, ``batch_size`` < 1, or no answer has any token.
    """
    if len(prompts) != len(answers):
        raise ValueError(
            f"answer_nll got {len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt."
        )
    if batch_size < 1:
        raise ValueError(f"answer_nll batch_size must be >= 1, got {batch_size}.")
    pairs = _encode_answer_pairs(tokenizer, prompts, answers, system_prompt)

    pad_id = _pad_token_id(model, tokenizer)
    device = _model_device(model)
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        input_ids, attention_mask = _pad_batch([p + a for p, a in chunk], pad_id, side="right")
        labels = torch.full_like(input_ids, -100)
        for row, (prompt_ids, answer_ids) in enumerate(chunk):
            labels[row, len(prompt_ids) : len(prompt_ids) + len(answer_ids)] = torch.tensor(answer_ids)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        # Position t predicts token t + 1.
        shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        shifted_labels = labels[:, 1:].reshape(-1).to(device)
        total_nll += torch.nn.functional.cross_entropy(
            shifted_logits, shifted_labels, ignore_index=-100, reduction="sum"
        ).item()
        total_tokens += int((shifted_labels != -100).sum())
    return total_nll / total_tokens
