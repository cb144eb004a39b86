"""Internal: the compiled path's MLPs run over real tokens only, padding skipped.

A padded batch ``[rows, seq]`` computes every position, padding included: on SmolLM2 over the
256 prompts of 8-160 tokens of issue 19 (batches of 32 sorted by length) 11 % of the tokens
computed are padding. On a CPU a forward's cost is its matrix products and the MLP holds most
of them (SmolLM2: three of the four 576-wide products of a token's layer, ~75 % of its
multiply-adds), so under dynamic shapes the compiled path runs each layer's MLP on the batch's
real tokens alone: a pre-hook gathers them, ``[rows, seq, d] -> [1, n_real, d]``, and a hook on
the output scatters the MLP's result back to ``[rows, seq, d]``, zero at padding.

Why real tokens keep their values: an MLP is a function of each token alone (mixtures of
experts route each token alone too), and a padded position is masked out of every real token's
attention, so what a padded position holds never reaches a real one. The residual stream *at*
padded positions differs from the eager model's; hookscope never returns it (padded slots are
zero). Rows added to fill ``batch_size`` (copies of the last row, dropped afterwards) count as
padding.

Hook order on each MLP: hookscope's capture hooks reading the MLP's input run before the gather
(the gather is installed after them), those reading its output after the scatter (which runs
first): every capture hook sees ``[rows, seq, d]``.

Only under dynamic shapes (a CPU's policy): the number of real tokens changes with every batch,
which a static graph would recompile for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import CompileError
from .hooks import ModuleHook


class RealTokens:
    """The flat indices ``[n_real]`` (long) of this call's real tokens in ``[rows * seq]``,
    read by the MLP hooks. One object per compiled forward, so dynamo sees the same object."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        # each MLP's padded shape, passed from its gather hook to its scatter hook within a call
        self.padded_shapes: list[dict[str, torch.Size | None]] = []

    def clear(self) -> None:
        """After a call: no index, and every MLP's shape forgotten, so that the next call enters
        the graph with the state it was traced with (dynamo guards on it: a shape left from
        the previous call recompiled the whole graph once)."""
        self.index = None
        for shapes in self.padded_shapes:
            shapes.clear()

    @staticmethod
    def of(model_inputs: dict[str, Any], own_rows: int) -> torch.Tensor:
        """The indices of the real tokens of padded ``model_inputs`` (``input_ids [rows, seq]``):
        attention mask 1, in a row below ``own_rows`` (the rest copy the last row)."""
        ids, mask = model_inputs["input_ids"], model_inputs.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool().clone()
        real[own_rows:] = False
        return real.flatten().nonzero().squeeze(1)


def unpadding_hooks(mlps: list[nn.Module], real: RealTokens) -> list[ModuleHook]:
    """Two hooks per MLP of ``mlps``: the gather of real tokens (install it after hookscope's
    capture hooks) and the scatter back (``first=True``: before them)."""
    hooks = []
    for mlp in mlps:
        gather, scatter = _hook_pair(real)
        hooks += [ModuleHook(mlp, gather, "input"), ModuleHook(mlp, scatter, "output", first=True)]
    return hooks


def _hooked_inside(mlp: nn.Module) -> bool:
    """Whether a module strictly inside ``mlp`` has forward hooks (a user's: hookscope puts
    none inside an MLP it unpads). Checked at each call, in the graph (dynamo guards on hooks)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in mlp.modules() if m is not mlp)


def _hook_pair(real: RealTokens) -> tuple[Any, Any]:
    padded_shape: dict[str, torch.Size | None] = {}  # this MLP's call: [rows, seq, d], or None
    real.padded_shapes.append(padded_shape)

    def gather(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs.get("hidden_states")
        others = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor)]
        if (
            real.index is None
            or not isinstance(hidden, torch.Tensor)
            or hidden.dim() != 3
            or any(a is not hidden for a in others)
            or _hooked_inside(module)
        ):
            # called another way, with other per-token inputs, or with a user's torch hook on a
            # module inside it (it would see [1, n_real, ...], not [rows, seq, ...]: a hook
            # that edits position -1 would edit one token of the batch): this MLP runs padded
            padded_shape["shape"] = None
            return None
        padded_shape["shape"] = hidden.shape
        tokens = hidden.reshape(-1, hidden.shape[-1]).index_select(0, real.index).unsqueeze(0)
        return (
            ((tokens, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": tokens})
        )

    def scatter(module: nn.Module, args: tuple, output: Any):
        shape = padded_shape.get("shape")
        if shape is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise CompileError(
                f"compile=True runs MLPs on real tokens only, and {type(module).__name__} returns "
                f"{type(output).__name__}, not one tensor; pass compile=False for this model."
            )
        rows, seq = shape[0], shape[1]
        flat = output.new_zeros(rows * seq, output.shape[-1])
        return flat.index_copy(0, real.index, output.reshape(-1, output.shape[-1])).view(
            rows, seq, output.shape[-1]
        )

    return gather, scatter
