"""Shared benchmark helpers: machine description, interleaved timing, paired ratios."""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import date

import torch
import transformers

import hookscope


def machine() -> str:
    """One line naming the machine and the versions that matter."""
    cpu = platform.processor() or platform.machine()
    try:
        model = subprocess.run(
            ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        cpu = model or cpu
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only ({cpu})"
    return (
        f"{date.today()} | {device} | {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, hookscope {hookscope.__version__}"
    )


def steady_allocator() -> bool:
    """glibc's malloc with fixed thresholds (Linux only; what ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set at start): freed activation buffers stay in the heap instead of
    going back to the OS after every op.

    Why the benchmarks use it: with glibc's default, adaptive thresholds the activations of a
    forward (up to ~32 MB each at 32 x 160 tokens) are mapped and unmapped again and again; a
    256-prompt pass of SmolLM2 took 0.4 to 1.5 million page faults, a number that depended on
    what the process had allocated before, so two variants running the same kernels differed by
    up to 15 % (measured). Fixed, they take none and every variant runs ~10 % faster.
    Returns whether it was applied."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
        libc.mallopt(m_trim_threshold, 1 << 31)
    )


def smollm2_config():
    """SmolLM2-135M's architecture (30 layers, 9 heads, 3 KV heads, d_model 576), for runs
    where its weights cannot travel (the GPU machine): timings depend on shapes, not values."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def dataset_prompts(n: int) -> list[str]:
    """``n`` short prompts of 3 to 10 words (the dataset-throughput rows use them)."""
    words = "the cat dog sat on mat capital France Paris river store drink".split()
    return [" ".join(words[(i * k) % len(words)] for k in range(1, 4 + i % 8)) for i in range(n)]


VARIED_WORDS = (
    "the model reads every token of the prompt and writes its residual stream after each layer "
    "while a researcher asks which heads move the name of the indirect object to the last "
    "position and how the answer forms across layers of a small language model trained on text"
).split()


def varied_prompts(tokenizer, n: int, low: int = 8, high: int = 160, seed: int = 0) -> list[str]:
    """``n`` prompts whose token counts are spread uniformly over ``low..high`` (seeded): the
    dataset rows of bench_compile and bench_peers (the setting of issue 19)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        target = rng.randint(low, high)
        words = [rng.choice(VARIED_WORDS) for _ in range(target)]
        ids = tokenizer(" ".join(words))["input_ids"][:target]
        prompts.append(tokenizer.decode(ids))
    return prompts


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Time every variant ``repeats`` times, interleaving them (rotating the order each round)
    so that machine noise hits all of them alike. Returns seconds per run, per variant."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            variants[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of time(name) / time(baseline) measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


def table(times: dict[str, list[float]], baseline: str) -> str:
    lines = [
        "| variant | median ms | ratio vs " + baseline + " (paired median) |",
        "| --- | ---: | ---: |",
    ]
    for name, values in times.items():
        lines.append(
            f"| {name} | {statistics.median(values) * 1e3:.1f} | {paired_ratio(times, name, baseline):.3f} |"
        )
    return "\n".join(lines)


def compiled_limit(hm, batches: list[dict], rows: int):
    """The compiled limit: the decoder under ``torch.compile`` without hooks, and ``batches``
    shaped as ``compile=True`` shapes them on the model's device (hookscope.compiled's shape
    policy: exact lengths with dynamic shapes on a CPU, length buckets elsewhere; short batches
    padded to ``rows``). Returns (compiled decoder, shaped batches)."""
    import torch

    from hookscope.compiled import BUCKET, dynamic_shapes, pad_to_bucket

    dynamic = dynamic_shapes(hm.device())
    side = hm.get_text_tokenizer().padding_side
    multiple = None if dynamic else BUCKET
    shaped = [
        pad_to_bucket(b, hm.hf_model, side, hm.pad_token_id, rows, multiple).model_inputs
        for b in batches
    ]
    return torch.compile(hm.model_map.decoder, dynamic=dynamic), shaped
