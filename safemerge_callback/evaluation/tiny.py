"""Tiny in-process chat models and tokenizers for tests, benchmarks and smoke runs.

Nothing here downloads anything: the tokenizer is a word-level ``tokenizers`` model built from
:data:`TINY_WORDS`, and the models are randomly initialised Llama networks of a few thousand
parameters. They exercise the same code paths as real checkpoints (chat templates, left padding,
``generate``, PEFT adapters, sequence classification) in milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

# Role tags are ordinary words of the vocabulary, so the template below renders to plain text.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TINY_WORDS: tuple[str, ...] = (
    PAD_TOKEN,
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "\n",
    "safe",
    "unsafe",
    "S1",
    "S2",
    "S3",
    "S9",
    "S10",
    "I",
    "I'm",
    "sorry,",
    "sorry",
    "but",
    "cannot",
    "can't",
    "help",
    "with",
    "that.",
    "As",
    "an",
    "AI",
    "Sure,",
    "here",
    "is",
    "how",
    "to",
    "make",
    "a",
    "bomb",
    "build",
    "write",
    "script",
    "steal",
    "money",
    "kill",
    "Python",
    "process",
    "the",
    "of",
    "and",
    "it",
    "this",
    "illegal",
    "unethical",
    "step",
    "first",
    "Question:",
    "Answer:",
    "####",
    "yes",
    "no",
    "maybe",
    "answer",
    "is:",
    "The",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
    "12",
    "18",
    "20",
    "42",
    "100",
    "hello",
    "world",
    "please",
    "tell",
    "me",
    "about",
    "cats",
    "dogs",
    "water",
    "fire",
    "apples",
    "Janet",
    "has",
    "eggs",
    "sells",
    "each",
    "for",
    "dollars",
    "much",
    "many",
    "does",
    "she",
    "earn",
)


def build_tiny_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer with a chat template, entirely in memory.

    Text is split on spaces, and every newline is its own token so that line-based outputs (such as
    ``"unsafe\\nS1"``) survive a round trip. Unknown words map to ``<unk>``.

    Args:
        extra_words: Words appended to :data:`TINY_WORDS`; duplicates are ignored.

    Returns:
        A fast tokenizer with ``<pad>``, ``<s>``, ``</s>`` and ``<unk>`` set and
        :data:`TINY_CHAT_TEMPLATE` as its chat template. Its padding side is ``"right"``, the
        library default, so callers must ask for left padding themselves.
    """
    words = list(dict.fromkeys([*TINY_WORDS, *extra_words]))
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # Keep each run of non-space characters and each newline as a piece; drop spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\s]+|\n"), behavior="removed", invert=True)
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2
) -> LlamaForCausalLM:
    """Build a randomly initialised tiny ``LlamaForCausalLM`` matching ``tokenizer``.

    Args:
        tokenizer: Tokenizer whose vocabulary size and special-token ids configure the model.
        seed: Seed for the weight initialisation; the same seed gives the same weights.
        hidden_size: Width of the residual stream; must be divisible by 4 (the number of heads).
        num_layers: Number of decoder layers.

    Returns:
        The model in eval mode, float32, on the CPU.
    """
    config = _tiny_llama_config(tokenizer, hidden_size, num_layers)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_scripted_causal_lm(
    tokenizer: PreTrainedTokenizerFast, transitions: Mapping[str, str], *, seed: int = 0, hidden_size: int = 32
) -> LlamaForCausalLM:
    """Build a tiny Llama whose greedy next token follows a fixed word-to-word table.

    The attention and MLP output projections are zeroed, so the last hidden state equals the
    embedding of the current token. Each ``lm_head`` row for a target word is set to the normalised
    embedding of its source word (scaled up), so greedy decoding after ``source`` emits ``target``.
    With ``{"<|assistant|>": "unsafe", "unsafe": "\\n", "\\n": "S1", "S1": "</s>"}`` a prompt
    ending in ``<|assistant|>`` decodes to ``"unsafe \\n S1"``.

    Args:
        tokenizer: Tokenizer built by :func:`build_tiny_tokenizer` (or one sharing its vocabulary).
        transitions: Source word to target word. Each target may appear only once, because it owns
            one row of ``lm_head``.
        seed: Seed for the random embeddings.
        hidden_size: Embedding width; larger widths make the random embeddings closer to orthogonal.

    Returns:
        The scripted model in eval mode.

    Raises:
        ValueError: If a word is not in the vocabulary or a target word is used twice.
    """
    targets = list(transitions.values())
    duplicates = sorted({word for word in targets if targets.count(word) > 1})
    if duplicates:
        raise ValueError(f"transitions maps several source words to {duplicates}; each target word may appear once.")
    vocab = tokenizer.get_vocab()
    unknown = sorted(word for pair in transitions.items() for word in pair if word not in vocab)
    if unknown:
        raise ValueError(f"transitions uses words missing from the tokenizer vocabulary: {unknown}.")

    model = build_tiny_causal_lm(tokenizer, seed=seed, hidden_size=hidden_size)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embeddings = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for source, target in transitions.items():
            source_vector = embeddings[vocab[source]]
            model.lm_head.weight[vocab[target]] = 10.0 * source_vector / source_vector.norm()
    return model


def build_tiny_sequence_classifier(
    tokenizer: PreTrainedTokenizerFast, labels: Sequence[str] = ("safe", "unsafe"), *, seed: int = 0
) -> LlamaForSequenceClassification:
    """Build a randomly initialised tiny ``LlamaForSequenceClassification``.

    Args:
        tokenizer: Tokenizer whose vocabulary and pad token configure the model. The pad token id
            lets the model find the last real token of each padded row.
        labels: Class names, in logit order; stored as ``config.id2label``.
        seed: Seed for the weight initialisation.

    Returns:
        The classifier in eval mode.
    """
    config = _tiny_llama_config(tokenizer, hidden_size=32, num_layers=2)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()
