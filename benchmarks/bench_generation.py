"""Benchmark the evaluation generation loop against a plain per-batch ``model.generate`` loop.

Both loops decode the same chat prompts greedily with the same batch size and token budget on a
tiny in-process Llama (no download). Runs alternate between the two loops (and swap order every
repetition) so that drifting machine load affects both alike. Throughput counts the generated
tokens before the end-of-sequence token.

    python benchmarks/bench_generation.py --repeats 5

The third row, with stop strings that never match, measures the cost of the per-step stop-string
check alone.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from safemerge_callback.evaluation.generation import GenerationSettings, generate_from_texts, render_chat_prompts
from safemerge_callback.evaluation.tiny import TINY_WORDS, build_tiny_causal_lm, build_tiny_tokenizer


def _prompts(count: int, seed: int) -> list[str]:
    """Return ``count`` random prompts of 2 to 40 vocabulary words."""
    generator = random.Random(seed)
    words = [word for word in TINY_WORDS[8:] if word != "\n"]
    return [" ".join(generator.choices(words, k=generator.randint(2, 40))) for _ in range(count)]


@torch.inference_mode()
def plain_loop(model, tokenizer, texts: list[str], batch_size: int, max_new_tokens: int) -> int:
    """Generate with one ``model.generate`` call per batch in input order; return generated tokens."""
    tokens = 0
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            tokens += row.index(eos) if eos in row else len(row)
    return tokens


def library_loop(model, tokenizer, texts: list[str], settings: GenerationSettings) -> int:
    """Generate with :func:`generate_from_texts`; return generated tokens."""
    return sum(generation.num_new_tokens for generation in generate_from_texts(model, tokenizer, texts, settings))


def _time(function) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = function()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="Number of prompts.")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Token budget per response.")
    parser.add_argument("--hidden-size", type=int, default=64, help="Width of the tiny Llama.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repetitions per loop.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(tokenizer, hidden_size=args.hidden_size)
    texts = render_chat_prompts(tokenizer, _prompts(args.prompts, seed=0))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, show_progress=False)
    never_matching = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        show_progress=False,
        stop_strings=("Question: never", "#### never"),
    )
    loops = {
        "plain model.generate loop": lambda: plain_loop(model, tokenizer, texts, args.batch_size, args.max_new_tokens),
        "generate_from_texts": lambda: library_loop(model, tokenizer, texts, settings),
        "generate_from_texts + stop strings": lambda: library_loop(model, tokenizer, texts, never_matching),
    }
    # The warm-up run also checks that both loops generate the same number of tokens.
    counts = {name: function() for name, function in loops.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"The loops generated different token counts: {counts}.")

    rates: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            seconds, tokens = _time(loops[name])
            rates[name].append(tokens / seconds)

    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, prompts={args.prompts}, "
        f"batch_size={args.batch_size}, max_new_tokens={args.max_new_tokens}, hidden_size={args.hidden_size}, "
        f"repeats={args.repeats}, tokens per run={counts[names[0]]}"
    )
    baseline = statistics.median(rates[names[0]])
    for name in names:
        median = statistics.median(rates[name])
        spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
        print(f"{name:38s} median {median:8.0f} tokens/s (range {spread}), ratio to plain {median / baseline:.2f}")


if __name__ == "__main__":
    main()
