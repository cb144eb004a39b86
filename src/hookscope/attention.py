"""hookscope's attention function: attention patterns and per-head q/k/v under any kernel.

transformers (v5) calls attention through ``ALL_ATTENTION_FUNCTIONS``: each attention module
projects q/k/v, applies rotary embeddings (and any q/k norm), then calls
``fn(module, query, key, value, attention_mask, scaling=..., **kwargs)`` with
``query [batch, n_heads, q_len, d_head]`` and ``key``/``value`` ``[batch, n_kv_heads, kv_len, d_head]``.

While a hooked call runs, :class:`AttentionHooks` switches the model's attention to hookscope's
function (see :mod:`hookscope.scoped_attention`, which keeps the model's kernel and mask). For an
attention module with nothing requested the original kernel runs with the same arguments, so
those layers compute exactly what they compute without hookscope. For a requested layer it reads the per-head vectors the kernel receives and
computes the softmax only for the requested query rows, ``[batch, n_heads, rows, kv_len]``, then
calls the original kernel for the output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .archs import ModelMap
from .points import point_key
from .positions import ResolvedPositions
from .scoped_attention import AttentionFn, scoped_attention


@dataclass
class LayerRequest:
    """What to read inside one layer's attention call, for a set of heads.

    Keys written: ``pattern_L{l}H{h}`` ``[batch, rows, P]`` (or ``[batch, rows, seq]`` with
    ``all_keys``), ``head_queries_``/``head_keys_``/``head_values_L{l}H{h}`` ``[batch, P, d_head]``,
    ``projected_value_L{l}H{h}`` ``[batch, P, d_model]``.
    """

    layer: int
    heads: list[int]
    pattern: bool = False
    queries: bool = False
    keys: bool = False
    values: bool = False
    projected_values: bool = False
    output_blocks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)


def output_projection_block(model_map: ModelMap, layer: int, head: int) -> torch.Tensor:
    """Head ``head``'s block of the attention output projection ``W_O``: ``[d_model, d_head]``,
    so that ``head_out = z_head @ block.T``."""
    o_proj = model_map.attention_child(layer, model_map.spec.o_proj, "output projection")
    d_head = model_map.d_head
    columns = slice(head * d_head, (head + 1) * d_head)
    weight = _materialized_weight(o_proj)
    if hasattr(o_proj, "nf"):  # GPT-2 Conv1D stores the weight as [in, out]
        return weight[columns, :].T
    return weight[:, columns]


def _materialized_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, also when accelerate keeps it offloaded (CPU or disk) between calls:
    then it is loaded for the moment and a copy is kept (hooks cannot see it during the call)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "offload", False):
        from accelerate.utils import align_module_device

        with align_module_device(module):
            return module.weight.detach().clone()
    return module.weight


def additive_mask_rows(
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    batch: int,
    q_len: int,
    kv_len: int,
    sliding_window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The mask the kernel applies, for the selected query rows, as an additive float tensor
    ``[batch, 1, rows, kv_len]`` (0 where attended, the most negative finite value elsewhere).

    Handles every form transformers passes: ``None`` (pure causal, no padding: SDPA's skip),
    a boolean 4-D mask (SDPA; True = attend), an additive float 4-D mask (eager), and a 2-D
    padding mask (flash kernels, which apply causality and ``sliding_window`` themselves).
    """
    device = rows.device
    query_pos = rows + (kv_len - q_len)  # absolute position of each row among the keys
    key_pos = torch.arange(kv_len, device=device)
    if attention_mask is None or attention_mask.dim() == 2:
        allowed = key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)
        # flash kernels get None without padding and apply the window themselves (SDPA gets
        # None only when the keys fit in the window, where this changes nothing)
        if sliding_window is not None:
            allowed &= key_pos.view(1, 1, -1) > query_pos.unsqueeze(-1) - sliding_window
        if attention_mask is not None:
            allowed &= attention_mask.bool().view(batch, 1, kv_len)
        allowed = allowed.unsqueeze(1)
    else:
        mask = attention_mask.expand(batch, -1, -1, -1)[:, :1]
        picked = mask.gather(2, rows.view(batch, 1, -1, 1).expand(-1, 1, -1, kv_len))
        if picked.dtype != torch.bool:
            return picked.to(dtype)  # already additive (eager): add it exactly as the kernel does
        allowed = picked
    # the most negative finite value, as HF's eager masks use: a row with no allowed key (a
    # padding query) stays finite instead of turning into NaN that would leak through values
    zeros = torch.zeros((), dtype=dtype, device=device)
    return torch.where(
        allowed, zeros, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    )


def _call_region(region: torch.Tensor, offset: int, q_len: int, kv_len: int) -> torch.Tensor:
    """A prompt-coordinate region ``[batch, T0, T0]`` cut to this call: ``[batch, q_len, kv_len]``."""
    batch, prompt = region.shape[0], region.shape[1]
    out = torch.zeros(batch, q_len, kv_len, dtype=torch.bool, device=region.device)
    rows = slice(offset, min(offset + q_len, prompt))
    cols = min(kv_len, prompt)
    out[:, : rows.stop - rows.start, :cols] = region[:, rows, :cols]
    return out


def edited_attention(query, key, value, attention_mask, kwargs, edits, offset):
    """Attention with pattern edits, in eager math: ``(output [batch, q_len, n_heads, d_head],
    probabilities [batch, n_heads, q_len, kv_len] float32)``.

    Pre-softmax edits change scores before the mask is added, so a masked key stays masked;
    post-softmax edits never write masked cells; ``renormalize`` rescales edited rows to sum 1.
    """
    batch, n_heads, q_len, d_head = query.shape
    kv_len, groups = key.shape[2], n_heads // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1).float()
    values = value.repeat_interleave(groups, dim=1)
    scaling = kwargs.get("scaling")
    scores = torch.matmul(query.float(), keys.transpose(-1, -2)) * (
        d_head**-0.5 if scaling is None else scaling
    )
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    rows = torch.arange(q_len, device=query.device).expand(batch, -1)
    additive = additive_mask_rows(
        attention_mask, rows, batch, q_len, kv_len, kwargs.get("sliding_window"), torch.float32
    )
    allowed = additive > torch.finfo(torch.float32).min / 2

    def cells(edit) -> torch.Tensor:  # [batch, n_heads, q_len, kv_len]
        heads = torch.zeros(n_heads, dtype=torch.bool, device=query.device)
        heads[edit.heads] = True
        region = _call_region(edit.region.to(query.device), offset, q_len, kv_len)
        return region.unsqueeze(1) & heads.view(1, -1, 1, 1)

    scores, allowed = _pre_softmax_edits(scores, allowed, edits, cells)
    scores = torch.where(allowed, scores + additive, torch.finfo(torch.float32).min)
    if kwargs.get("s_aux") is not None:
        sink = kwargs["s_aux"].float().view(1, -1, 1, 1).expand(batch, -1, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    # masked and blocked cells get exactly 0; a row with nothing left (padding) is all zeros
    probs = _post_softmax_edits(probs.masked_fill(~allowed, 0.0), allowed, edits, cells, offset)
    output = torch.matmul(probs.to(values.dtype), values).transpose(1, 2).contiguous()
    return output, probs


def _pre_softmax_edits(scores, allowed, edits, cells):
    """Scores ``[batch, heads, q_len, kv_len]`` and the allowed mask after the pre-softmax
    edits: ``block`` removes cells from ``allowed``, ``scale`` / ``set`` change their scores."""
    for edit in (e for e in edits if e.edit.stage == "pre"):
        where = cells(edit)
        if edit.edit.op == "block":
            allowed = allowed & ~where
            continue
        new = (
            scores * edit.edit.value
            if edit.edit.op == "scale"
            else torch.full_like(scores, edit.edit.value)
        )
        scores = torch.where(where, new, scores)
    return scores, allowed


def _post_softmax_edits(probs, allowed, edits, cells, offset):
    """Probabilities after the post-softmax edits (never on masked cells), each edited row
    renormalised when its edit asks for it."""
    for edit in (e for e in edits if e.edit.stage == "post"):
        where = cells(edit) & allowed
        if edit.edit.op == "patch":
            new = _patched_probs(probs, edit, offset)
        else:
            new = {
                "zero": torch.zeros_like(probs),
                "scale": probs * edit.edit.value,
                "set": torch.full_like(probs, edit.edit.value),
                "freeze": probs.detach(),  # same values, no gradient through the scores
            }[edit.edit.op]
        probs = torch.where(where, new, probs)
        if edit.edit.renormalize:
            touched = where.any(-1, keepdim=True)
            probs = torch.where(
                touched, probs / probs.sum(-1, keepdim=True).clamp(min=1e-30), probs
            )
    return probs


def _patched_probs(probs: torch.Tensor, edit, offset: int) -> torch.Tensor:
    """``probs`` with the edit's grid cells taken from its source ``[batch, rows, columns]``."""
    out = probs.clone()
    q_len = probs.shape[2]
    (row_index, row_mask), (col_index, col_mask) = (
        edit.query_positions.on(probs.device),
        edit.key_positions.on(probs.device),
    )
    for b in range(probs.shape[0]):
        q = row_index[b] - offset
        k = col_index[b]
        keep_q = row_mask[b] & (q >= 0) & (q < q_len)
        keep_k = col_mask[b] & (k < probs.shape[3])
        src = edit.source[b].to(probs.device, torch.float32)[keep_q][:, keep_k]
        for head in edit.heads:
            out[b, head, q[keep_q].unsqueeze(1), k[keep_k].unsqueeze(0)] = src
    return out


def pattern_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    scaling: float | None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-softmax attention probabilities for the selected query rows only.

    Args:
        query: ``[batch, n_heads, q_len, d_head]`` (after rotary embedding).
        key: ``[batch, n_kv_heads, kv_len, d_head]``.
        rows: ``[batch, R]`` query indices per example.
        scaling / softcap / sinks: as the kernel receives them.

    Returns:
        ``[batch, n_heads, R, kv_len]`` in float32.
    """
    batch, n_heads, q_len, d_head = query.shape
    kv_len = key.shape[2]
    picked = query.gather(2, rows.view(batch, 1, -1, 1).expand(-1, n_heads, -1, d_head))
    keys = key.repeat_interleave(
        n_heads // key.shape[1], dim=1
    )  # head h reads KV group h // groups
    scale = d_head**-0.5 if scaling is None else scaling
    scores = torch.matmul(picked.float(), keys.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + additive_mask_rows(
        attention_mask, rows, batch, q_len, kv_len, sliding_window, torch.float32
    )
    if sinks is not None:  # a learned per-head logit that takes probability mass but no value
        sink = sinks.float().view(1, -1, 1, 1).expand(batch, -1, scores.shape[2], 1)
        return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.softmax(scores, dim=-1)


class AttentionHooks:
    """Installs hookscope's attention function for one call: it writes what ``requests`` ask
    for into ``sink`` and applies pattern ``edits`` (the one place attention matrices change).

    Args:
        model_map: the resolved model.
        requests: one :class:`LayerRequest` per requested layer.
        positions: the target positions (columns of patterns, and per-head vector rows).
        row_positions: the query rows of patterns (default: the target positions).
        sink: where captured tensors go, by cache key.
        all_keys: patterns keep every key column (``[batch, rows, seq]``) instead of the targets.
        average: average per-position vectors over each position item (``extract_avg``).
        keep_gradient: keep the autograd graph through captured tensors.
        edits: resolved pattern edits by layer (see ``hookscope.editing``).
        window: the call window (which absolute positions the call covers); None: all.
    """

    def __init__(
        self,
        model_map: ModelMap,
        requests: list[LayerRequest],
        positions: ResolvedPositions,
        row_positions: ResolvedPositions | None,
        sink: dict[str, torch.Tensor],
        all_keys: bool = False,
        average: bool = False,
        keep_gradient: bool = False,
        edits: dict | None = None,
        window: Any = None,
    ):
        self.model_map = model_map
        self.edits = {
            id(model_map.layers[layer].attention): e for layer, e in (edits or {}).items()
        }
        self.window = window
        self.requests = {id(model_map.layers[r.layer].attention): r for r in requests}
        self.positions = positions
        self.row_positions = row_positions or positions
        self.sink = sink
        self.all_keys = all_keys
        self.average = average
        self.keep_gradient = keep_gradient

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Switch this model's language-model attention to hookscope's function for the block
        (nothing else in the process changes); restore its own implementation on exit."""
        if not self.requests and not self.edits:
            yield
            return
        with scoped_attention(self.model_map, self._attend):
            yield

    def _attend(
        self, original: AttentionFn, module, query, key, value, attention_mask, *args, **kwargs
    ):
        """One attention call of a hooked layer: capture what is requested, apply any pattern
        edits (eager math), otherwise let the model's own kernel compute the output."""
        request, edits = self.requests.get(id(module)), self.edits.get(id(module))
        offset = key.shape[2] - query.shape[2]  # tokens already in the KV cache
        if edits and (self.window is None or self.window.covers("prompt")):
            output, probs = edited_attention(
                query, key, value, attention_mask, kwargs, edits, offset
            )
            if request is not None:
                self._capture(request, query, key, value, attention_mask, kwargs, probs)
            return output, probs.to(query.dtype)  # the pattern the model really used
        if request is not None:
            self._capture(request, query, key, value, attention_mask, kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    def _store(self, key: str, value: torch.Tensor, per_position: bool = True) -> None:
        if per_position and self.average:
            value = self.positions.average(value)
        self.sink[key] = value if self.keep_gradient else value.detach()

    def _capture(self, request, query, key, value, attention_mask, kwargs, edited=None) -> None:
        layer, groups = request.layer, query.shape[1] // key.shape[1]
        select = self.positions.select
        if request.pattern:
            rows_index, rows_mask = self.row_positions.on(query.device)
            if edited is not None:  # the pattern the model really used
                gather = rows_index.view(rows_index.shape[0], 1, -1, 1).expand(
                    -1, edited.shape[1], -1, edited.shape[-1]
                )
                probs = edited.gather(2, gather).to(query.dtype)
            else:
                probs = pattern_rows(
                    query,
                    key,
                    attention_mask,
                    rows_index,
                    kwargs.get("scaling"),
                    kwargs.get("softcap"),
                    kwargs.get("sliding_window"),
                    kwargs.get("s_aux"),
                ).to(query.dtype)
            # every requested head at once: [batch, heads, R, kv_len] -> [batch, heads, R, P]
            chosen = probs[:, request.heads]
            keep = rows_mask[:, None, :, None]
            if not self.all_keys:
                index, columns = self.positions.on(query.device)
                gather = index[:, None, None, :].expand(*chosen.shape[:3], index.shape[1])
                chosen = chosen.gather(3, gather)
                keep = keep & columns[:, None, None, :]
            chosen = chosen * keep
            for slot, head in enumerate(request.heads):
                self._store(point_key("pattern", layer, head), chosen[:, slot], False)
        for head in request.heads:
            kv_head = head // groups
            if request.queries:
                self._store(point_key("head_queries", layer, head), select(query[:, head]))
            if request.keys:
                self._store(point_key("head_keys", layer, head), select(key[:, kv_head]))
            if request.values or request.projected_values:
                head_values = select(value[:, kv_head])
                if request.values:
                    self._store(point_key("head_values", layer, head), head_values)
                if request.projected_values:
                    block = request.output_blocks[head].to(head_values.dtype)
                    self._store(point_key("projected_value", layer, head), head_values @ block.T)
