"""extract_cache over a dataloader equals forward on each example alone, in order."""

from __future__ import annotations

import torch
from tiny_models import PROMPTS, build_tokenizer

from hookscope import ExtractionConfig

CONFIG = ExtractionConfig(extract_resid_out=True, extract_mlp_out=True)


def test_dataloader_batches_with_labels_and_variable_widths(tiny_llama):
    tokenizer = build_tokenizer("left")
    batches = [
        tokenizer(PROMPTS[i : i + 2], return_tensors="pt", padding=True)
        | {"label": torch.tensor([i, i + 1])}
        for i in (0, 2)
    ]
    cache = tiny_llama.extract_cache(
        batches,
        ["all", "last"],
        extraction_config=CONFIG,
        batch_saver=lambda b: {"label": b["label"]},
    )
    assert cache["batch_saver"]["label"].tolist() == [0, 1, 2, 3]
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    width = max(lengths)
    assert cache["mapping_index"] == {"all": list(range(width)), "last": [width]}
    assert cache["resid_out_1"].shape == (4, width + 1, 64)
    for row, prompt in enumerate(PROMPTS):
        alone = tiny_llama.forward(
            tokenizer(prompt, return_tensors="pt"), ["all", "last"], extraction_config=CONFIG
        )
        n = lengths[row]
        for key in ("resid_out_0", "resid_out_1", "mlp_out_1", "logits"):
            torch.testing.assert_close(cache[key][row, :n], alone[key][0, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                cache[key][row, width], alone[key][0, n], rtol=1e-5, atol=1e-5
            )
            assert torch.all(cache[key][row, n:width] == 0)
        assert cache["position_mask"][row].sum() == n + 1


def test_list_of_strings_is_batched_by_config(tiny_llama):
    tiny_llama.config.batch_size = 3
    cache = tiny_llama.extract_cache(PROMPTS, ["last"], extraction_config=CONFIG)
    for row, prompt in enumerate(PROMPTS):
        alone = tiny_llama.forward(prompt, ["last"], extraction_config=CONFIG)
        torch.testing.assert_close(
            cache["resid_out_1"][row], alone["resid_out_1"][0], rtol=1e-5, atol=1e-5
        )
