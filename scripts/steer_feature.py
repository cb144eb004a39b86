"""Steer SmolLM2 with one feature of its dictionary and check the text moves the way the card says.

Needs the dictionary of ``scripts/train_dictionary.py`` (``make dictionary``). Steps:

1. **Candidates**: features that fire on 0.05%..3% of the store's tokens, ranked by how sharply
   their logit effects (``W_dec[i] @ W_U^T``) single out a few tokens (z-score of the largest);
   their cards are written to ``OUT/cards.html`` and ``OUT/cards.txt``.
2. **Steering**: for each of the first ``--candidates`` (or the ``--feature`` given), greedy
   generation from neutral prompts without and with
   ``Steer(point=d.reads, vector=d.W_dec[i], coefficient=c, relative=True, apply_to="both")``.
3. **The card's prediction, measured**: the share of generated tokens that are among the
   feature's 50 most promoted tokens (by the card's logit effects), before and after. The
   feature with the largest increase is reported (and, with its texts, saved in
   ``OUT/steering.json``).

    python scripts/steer_feature.py                      # rank, steer 6 candidates
    python scripts/steer_feature.py --feature 123 --coefficient 0.6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_dictionary import default_out  # noqa: E402

from hookscope import HookedModel  # noqa: E402
from hookscope.dictionaries import load_dictionary  # noqa: E402
from hookscope.dictionaries.cards import cards_page, feature_cards, logit_effects  # noqa: E402
from hookscope.interventions import Steer  # noqa: E402
from hookscope.store import ActivationStore  # noqa: E402

PROMPTS = [
    "My favourite thing to do on a sunny weekend is",
    "The old man looked out of the window and said",
    "Here is a short story about a cat:",
]


def densities(store: ActivationStore, dictionary, slots=slice(1, None)) -> torch.Tensor:
    """Fraction of the store's tokens (all slots but the first) where each feature fires ``[d_sae]``."""
    fired, total = torch.zeros(dictionary.d_sae), 0
    for index in range(store.num_shards):
        data = store.shard(index, [dictionary.reads])
        mask = data["position_mask"].bool()
        mask[:, : slots.start] = False
        with torch.no_grad():
            fired += (dictionary.encode(data[dictionary.reads][mask]) > 0).sum(0).float()
        total += int(mask.sum())
    return fired / total


def candidates(dictionary, unembedding, density, count: int) -> list[int]:
    """Features of density 0.05%..3% with the sharpest logit effects (z-score of the top one)."""
    effects = unembedding.detach() @ (dictionary.W_dec.T / dictionary.input_scale)  # [vocab, d_sae]
    z = (effects.max(0).values - effects.mean(0)) / effects.std(0)
    z[(density < 5e-4) | (density > 0.03)] = float("-inf")
    return z.topk(count).indices.tolist()


def generate(hm, prompts, interventions=None, max_new_tokens=32) -> list[str]:
    batch = hm.get_tokenizer()(prompts, return_tensors="pt", padding=True, padding_side="left")
    return hm.generate(
        batch, max_new_tokens=max_new_tokens, do_sample=False, return_text=True,
        interventions=interventions,
    )  # fmt: skip


def promoted_share(hm, texts: list[str], promoted: set[int]) -> float:
    """Share of the tokens of ``texts`` that are in ``promoted``."""
    ids = [
        t for text in texts for t in hm.get_tokenizer()(text, add_special_tokens=False)["input_ids"]
    ]
    return sum(t in promoted for t in ids) / max(len(ids), 1)


def steer(hm, dictionary, feature, coefficient, promoted: set[int], plain: list[str], new: int):
    """Greedy text with the feature's decoder row added at every token (prompt and generated),
    ``coefficient`` x the token's own residual norm; the promoted-token share before / after."""
    steered = generate(hm, PROMPTS, [Steer(
        point=dictionary.reads, vector=dictionary.W_dec[feature], coefficient=coefficient,
        relative=True, apply_to="both",
    )], max_new_tokens=new)  # fmt: skip
    return {
        "feature": feature,
        "coefficient": coefficient,
        "share_before": promoted_share(hm, plain, promoted),
        "share_after": promoted_share(hm, steered, promoted),
        "before": plain,
        "after": steered,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out("resid_out_15"))
    parser.add_argument("--feature", type=int, nargs="*", default=None, help="steer these only")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument(
        "--coefficient", type=float, nargs="+", default=[0.2], help="x each token's norm"
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    hm = HookedModel.from_pretrained()
    tokenizer = hm.get_tokenizer()
    dictionary = load_dictionary(args.out / "dictionary")
    store = ActivationStore.open(args.out / "store")
    unembedding = hm.hf_model.get_output_embeddings().weight
    density = densities(store, dictionary)
    chosen = args.feature if args.feature else candidates(
        dictionary, unembedding, density, args.candidates
    )  # fmt: skip
    cards = feature_cards(store, dictionary, chosen, tokenizer, unembedding, slots=slice(1, None))
    (args.out / "cards.html").write_text(cards_page(cards, "SmolLM2 resid_out_15 features"))
    (args.out / "cards.txt").write_text("\n\n".join(card.to_text() for card in cards))
    plain = generate(hm, PROMPTS, max_new_tokens=args.max_new_tokens)
    runs = []
    for card in cards:
        effects = logit_effects(dictionary, unembedding, card.feature)
        promoted = set(effects.topk(50).indices.tolist())
        for coefficient in args.coefficient:
            run = steer(
                hm, dictionary, card.feature, coefficient, promoted, plain, args.max_new_tokens
            )
            run["card"] = card.to_text()
            runs.append(run)
            print(json.dumps(run, indent=1), flush=True)
    best = max(runs, key=lambda r: r["share_after"] - r["share_before"])
    (args.out / "steering.json").write_text(json.dumps({"best": best, "runs": runs}, indent=1))
    print("\nbest:", json.dumps(best, indent=1))
    return best


if __name__ == "__main__":
    main()
