"""easyroutine's patching entry point, ``HookedModel.compute_patching``, over ``hm.forward``:
``patching_query`` dicts, ``base_dictonary_idxs`` / ``target_dictonary_idxs`` spelled as it
spells them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..cache import ActivationCache
from ..config import FLAG_OF_KIND, HEAD_FLAGS, LAYER_FLAGS, ExtractionConfig
from ..dataset import is_one_batch
from ..errors import HookscopeError, InputError
from ..interventions import Patch
from ..points import KINDS, parse_point


def compute_patching(
    hm: Any,
    target_token_positions: Sequence[Any],
    base_dataloader: Any,
    target_dataloader: Any,
    patching_query: Sequence[dict[str, Any]] = (
        {"patching_elem": "@last", "layers_to_patch": [0], "activation_type": "resid_in_{}"},
    ),
    base_dictonary_idxs: Sequence[Any] | None = None,
    target_dictonary_idxs: Sequence[Any] | None = None,
    return_logit_diff: bool = False,
    batch_saver: Any = None,
    extraction_config: ExtractionConfig | None = None,
    **kwargs: Any,
):
    """Patch the base run's activations into the target run (batch by batch, examples aligned).

    ``patching_query`` entries: ``patching_elem`` (``"@last"``, ``"@0"``, a list of them),
    ``layers_to_patch`` and ``activation_type`` (``"resid_in_{}"``, ``"head_out_L{}H3"``...).
    ``base_dictonary_idxs`` / ``target_dictonary_idxs``: per batch, one token id (or a list,
    whose logits are averaged) per example.

    Returns an :class:`ActivationCache` of the patched target run (``extraction_config`` at
    ``target_token_positions``) and, with ``return_logit_diff``: ``logit_diff_in_clean``,
    ``logit_diff_in_patched`` (``[batch]``, logit(target) - logit(base) in the unpatched and
    patched target runs), ``logit_diff_variation`` (patched minus clean), and
    ``kl_clean_to_patched`` = KL(clean || patched) of the next-token distributions.
    """
    from ..keywords import check_model_kwargs, own_keywords

    forwarded = own_keywords(type(hm).forward) - {"inputs", "target_token_positions"}
    check_model_kwargs(kwargs, hm.hf_model, compute_patching, extra_valid=forwarded)
    queries = _parse_queries(patching_query)
    merged = ActivationCache(pad_token_id=hm.pad_token_id)
    base_batches, target_batches = _batch_list(base_dataloader), _batch_list(target_dataloader)
    _check_batches(hm, base_batches, target_batches)
    if return_logit_diff:
        for name, idxs in (
            ("base_dictonary_idxs", base_dictonary_idxs),
            ("target_dictonary_idxs", target_dictonary_idxs),
        ):
            _check_dictionary_idxs(hm, name, idxs, target_batches)
    for index, (base, target) in enumerate(zip(base_batches, target_batches, strict=True)):
        interventions = _patches_from(hm, base, queries)
        patched = hm.forward(
            target,
            target_token_positions,  # forward reads one item ("last") or a list of them
            extraction_config=extraction_config,
            interventions=interventions,
            **kwargs,
        )
        if return_logit_diff:
            ids = (base_dictonary_idxs[index], target_dictonary_idxs[index])
            patched.update(_logit_diff_fields(hm, target, interventions, *ids, **kwargs))
        if batch_saver is not None and (payload := batch_saver(target)) is not None:
            patched["batch_saver"] = payload
        merged.cat(patched)
    return merged


def _patches_from(hm: Any, base: Any, queries: list[tuple[list, list[str]]]) -> list[Patch]:
    """One :class:`Patch` per queried point, its source extracted from the base batch."""
    patches = []
    for positions, points in queries:
        config = ExtractionConfig(**_flags_for(points, hm.model_map), save_logits=False)
        source = hm.forward(base, positions, extraction_config=config)
        patches += [Patch(point=p, positions=positions, source=source) for p in points]
    return patches


def _logit_diff_fields(
    hm: Any, target: Any, patches: list[Patch], base_ids: Any, target_ids: Any, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """``[batch]`` logit(target) - logit(base) before and after patching, their difference,
    and KL(clean || patched) of the next-token distributions, at the last real token; ``kwargs``
    (hooks, model keywords) as in the patched run, so all three runs see the same model."""
    clean = hm.forward(target, ["last"], **kwargs)["logits"][:, 0]
    after = hm.forward(target, ["last"], interventions=patches, **kwargs)["logits"][:, 0]
    in_clean = _logit_of(clean, target_ids) - _logit_of(clean, base_ids)
    in_patched = _logit_of(after, target_ids) - _logit_of(after, base_ids)
    clean_lp, after_lp = clean.float().log_softmax(-1), after.float().log_softmax(-1)
    return {
        "logit_diff_in_clean": in_clean,
        "logit_diff_in_patched": in_patched,
        "logit_diff_variation": in_patched - in_clean,
        "kl_clean_to_patched": (clean_lp.exp() * (clean_lp - after_lp)).sum(-1),
    }


def _batch_list(dataloader: Any) -> list[Any]:
    """The batches of a dataloader (one batch, see :func:`~hookscope.dataset.is_one_batch`,
    is a list of one)."""
    if is_one_batch(dataloader):
        return [dataloader]
    return list(dataloader)


def _rows(hm: Any, batch: Any) -> int:
    return len(hm.prepare_inputs(batch, "cpu")["input_ids"])


def _check_batches(hm: Any, base_batches: list, target_batches: list) -> None:
    """Base and target must pair batch by batch and row by row (checked before any forward)."""
    if len(base_batches) != len(target_batches):
        raise InputError(
            f"base and target dataloaders differ in length ({len(base_batches)} vs "
            f"{len(target_batches)} batches)."
        )
    if not base_batches:
        raise InputError("compute_patching got empty dataloaders.")
    for index, (base, target) in enumerate(zip(base_batches, target_batches, strict=True)):
        base_rows, target_rows = _rows(hm, base), _rows(hm, target)
        if base_rows != target_rows:
            raise InputError(
                f"compute_patching batch {index}: the base batch has {base_rows} examples, the "
                f"target batch {target_rows}; examples are patched row by row, so they must match."
            )


def _check_dictionary_idxs(hm: Any, name: str, idxs: Any, batches: list) -> None:
    """``idxs`` must hold, per batch, one entry per example: a token id or a non-empty list of
    ids (whose logits are averaged), each within the vocabulary. Checked before any forward.

    Raises:
        InputError: naming the batch, the example and what is wrong.
    """
    if idxs is None:
        raise InputError(f"return_logit_diff needs {name} (per batch, one token id per example).")
    if isinstance(idxs, int | str | torch.Tensor) or not isinstance(idxs, Sequence):
        raise InputError(
            f"{name} must be a list with one entry per batch ({len(batches)}), each a list of "
            f"token ids per example; got {type(idxs).__name__}."
        )
    if len(idxs) != len(batches):
        raise InputError(f"{name} has {len(idxs)} entries for {len(batches)} batches.")
    vocab = hm.hf_model.get_output_embeddings().weight.shape[0]
    for index, (entry, batch) in enumerate(zip(idxs, batches, strict=True)):
        rows = _rows(hm, batch)
        entry = entry.tolist() if isinstance(entry, torch.Tensor) else entry
        if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != rows:
            raise InputError(
                f"{name}[{index}] must list one token id (or a list of ids) per example of "
                f"batch {index} ({rows} examples); got {entry!r}."
            )
        for row, ids in enumerate(entry):
            flat = [ids] if isinstance(ids, int) else ids
            if (
                not isinstance(flat, Sequence)
                or not flat
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in flat)
                or not all(0 <= i < vocab for i in flat)
            ):
                raise InputError(
                    f"{name}[{index}][{row}] must be a token id in 0..{vocab - 1} or a non-empty "
                    f"list of them; got {ids!r}."
                )


def _logit_of(logits: torch.Tensor, ids: Any) -> torch.Tensor:
    """Per example: the logit of its token id, or the mean logit of its list of ids."""
    out = []
    for row, entry in enumerate(ids):
        entry = torch.as_tensor(entry).reshape(-1)
        out.append(logits[row, entry].float().mean())
    return torch.stack(out)


_QUERY_KEYS = ("patching_elem", "layers_to_patch", "activation_type")


def _parse_queries(patching_query) -> list[tuple[list, list[str]]]:
    """``patching_query`` (a list of entries, or one entry) -> ``[(positions, points)]``.

    Raises:
        HookscopeError: no entry, an entry that lacks a key, or an ``activation_type`` without
            ``{}`` for several layers; KeywordError: an unknown key (naming the closest).
    """
    if isinstance(patching_query, Mapping):
        patching_query = [patching_query]  # one entry
    if not patching_query:
        raise HookscopeError(
            "patching_query is empty: nothing would be patched. Give entries such as "
            "{'patching_elem': '@last', 'layers_to_patch': [0], 'activation_type': 'resid_in_{}'}."
        )
    return [_parse_query(query) for query in patching_query]


def _parse_query(query: Any) -> tuple[list, list[str]]:
    from ..keywords import raise_unknown_keyword

    if not isinstance(query, Mapping):
        raise HookscopeError(
            f"a patching_query entry must be a dict with {list(_QUERY_KEYS)}, got {query!r}."
        )
    for key in query:
        if key not in _QUERY_KEYS:
            raise_unknown_keyword(key, _QUERY_KEYS, "patching_query entry")
    missing = set(_QUERY_KEYS) - set(query)
    if missing:
        raise HookscopeError(f"patching_query entry {query!r} lacks {sorted(missing)}.")
    elems = query["patching_elem"]
    elems = [elems] if isinstance(elems, str) else list(elems)
    positions = []
    for elem in elems:
        if not isinstance(elem, str) or not elem.startswith("@"):
            raise HookscopeError(f"patching_elem {elem!r} must look like '@last' or '@3'.")
        body = elem[1:]
        positions.append(int(body) if body.lstrip("-").isdigit() else body)
    layers = query["layers_to_patch"]
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    points = [query["activation_type"].format(layer) for layer in layers]
    if len(set(points)) != len(points):
        raise HookscopeError(
            f"activation_type {query['activation_type']!r} has no '{{}}' for the layer, so "
            f"layers_to_patch {layers} would all patch {points[0]!r}; write e.g. 'resid_in_{{}}'."
        )
    return positions, points


def _flags_for(points: list[str], model_map: Any) -> dict[str, Any]:
    """ExtractionConfig flags that extract ``points`` (what the patches read from)."""
    flags: dict[str, Any] = {}
    heads = []
    for name in points:
        point = parse_point(name, model_map)
        kind = KINDS[point.kind].write_kind  # head_out's patch source is head_z
        if point.head is not None and kind in HEAD_FLAGS.values():
            flags[FLAG_OF_KIND[kind]] = True
            heads.append({"layer": point.layer, "head": point.head})
        elif point.head is None and kind in LAYER_FLAGS.values():
            flags[FLAG_OF_KIND[kind]] = True
        else:
            raise HookscopeError(f"activation_type {name!r} cannot be patched by compute_patching.")
    if heads:
        flags["attn_heads"] = heads
    return flags
