"""Activation points as data: one table (:data:`KINDS`) says what each kind of point is, and
the key grammar that names one point, ``(kind, layer, head)`` <-> cache key, in one place.

Three shapes of key, built by :func:`point_key` (``Point.name``) and parsed by :func:`parse_point`:

* model-level: ``input_embeddings``, ``last_layernorm``, ``logits``, ``input_ids``
* per layer: ``{kind}_{layer}``, e.g. ``resid_out_3``, ``attn_in_0``
* per head: ``{kind}_L{layer}H{head}``, e.g. ``pattern_L2H5``, ``head_out_L0H1``

Each :class:`PointKind` row declares its scope, shape and definition, the ``ExtractionConfig``
flag that extracts it, where it is read (:class:`Site`: a module role and its input or output,
or inside the attention function), its width, whether interventions may write it, any
reference-design spelling, and its TransformerLens hook name with a predicate saying on which
models that name has the same definition. ``config`` (flags), ``capture.locate`` (modules),
``plan`` (attention requests), ``editing`` (widths, sources), the TransformerLens aliases and
the README's point table (:func:`readme_table`) all derive from it.

TransformerLens hook names (``blocks.3.hook_resid_post``) are accepted as aliases, so code and
SAE weights keyed by them carry over. A name means what it means in TransformerLens on every
family, or it is refused: ``blocks.{l}.hook_attn_out`` is what attention adds to the residual
stream, which is ``attn_out_{l}`` on pre-norm families and ``attn_out_post_norm_{l}`` (after the
post-attention norm) on Gemma2/Gemma3/OLMo2, so resolving it needs the model
(``parse_point(name, model_map)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import ActivationPointError, choices

if TYPE_CHECKING:
    from .archs import ModelMap

Scope = Literal["model", "layer", "head"]


@dataclass(frozen=True)
class Site:
    """Where a kind is read: the module of role ``module`` (resolved by ``capture.locate``:
    ``first_block``, ``block``, ``attention``, ``mlp``, ``resid_mid_site``, ``attn_out_norm``,
    ``mlp_out_norm``, ``final_norm``, ``q_proj`` / ``k_proj`` / ``v_proj`` (or their columns
    of a fused projection), ``o_proj``; vision: ``vision_block``, ``vision_attention``,
    ``projector``), its ``"input"`` or ``"output"``; ``part`` narrows to head h's ``d_head``
    columns (``"head"``), optionally through head h's block of ``W_O`` (``"head @ W_O"``).

    Kinds not read by a module hook have ``module`` ``attention_function`` (inside hookscope's
    attention function), ``running_mean``, ``model_output`` (logits) or ``model_input``.
    """

    module: str
    hook: Literal["input", "output"] | None = None
    part: Literal["head", "head @ W_O"] | None = None

    def __str__(self) -> str:
        where = f"{self.module} {self.hook}" if self.hook else self.module
        return f"{where}, {self.part} columns" if self.part else where


ATTENTION_FUNCTION = Site("attention_function")
MODULE_ROLES_VISION = frozenset({"vision_block", "vision_attention", "projector"})


def _always(_model_map: ModelMap) -> bool:
    return True


@dataclass(frozen=True)
class TLAlias:
    """A TransformerLens hook name (``blocks.{l}.{hook}``) for a kind.

    Attributes:
        hook: the name after ``blocks.{l}.``.
        head_axis: None for one-point hooks; else the axis along which the kind's per-head
            points stack into TransformerLens's layout.
        same_on: whether TransformerLens's definition of ``hook`` equals this kind's on a
            model (the family check: a name is never mapped to another quantity).
        where: the models where ``same_on`` holds, in words (errors and docs).
    """

    hook: str
    head_axis: int | None = None
    same_on: Callable[[ModelMap], bool] = _always
    where: str = ""

    @property
    def conditional(self) -> bool:
        return self.same_on is not _always


def _no_post_attention_norm(m: ModelMap) -> bool:
    return not m.discovered and m.spec.attn_out_norm is None


def _post_attention_norm(m: ModelMap) -> bool:
    return m.spec.attn_out_norm is not None


def _no_post_feedforward_norm(m: ModelMap) -> bool:
    return not m.discovered and m.spec.mlp_out_norm is None


def _post_feedforward_norm(m: ModelMap) -> bool:
    return m.spec.mlp_out_norm is not None


def _input_norm(m: ModelMap) -> bool:
    # TransformerBridge's ln1 is the input norm, except on post-norm OLMo2 where it maps ln1
    # to post_attention_layernorm: there ln1.hook_out is not the attention input.
    return m.spec.input_norm is not None


def _rotary(m: ModelMap) -> bool:
    return hasattr(m.decoder, "rotary_emb")


@dataclass(frozen=True)
class PointKind:
    """One kind of activation point (see the module docstring; the README's table renders these).

    Attributes:
        name, scope, shape, definition: the key's kind, ``model`` / ``layer`` / ``head``, the
            tensor shape and its one-line definition (markdown).
        flag: the ``ExtractionConfig`` field that extracts it.
        site: where it is read (:class:`Site`).
        width: the last axis: ``d_model``, ``d_head``, ``n_heads*d_head``, ``n_kv_heads*d_head``,
            ``vocab`` or ``d_vision`` (see :func:`width_of`).
        not_writable: None when interventions may write it, else why not and what to use.
        written_as: the kind an intervention writes instead (``head_out`` is written as
            ``head_z``, in the output projection's input), also the key a patch source needs.
        request: the ``attention.LayerRequest`` field that asks the attention function for it.
        averages: for a running mean, the per-example kind it averages.
        spelling_of: for a reference-design spelling, the kind it is another name of.
        tl: its TransformerLens hook name, if any.
    """

    name: str
    scope: Scope
    shape: str
    definition: str
    flag: str
    site: Site
    width: str = "d_model"
    not_writable: str | None = None
    written_as: str | None = None
    request: str | None = None
    averages: str | None = None
    spelling_of: str | None = None
    tl: TLAlias | None = None

    @property
    def write_kind(self) -> str:
        """The kind an intervention on this kind writes (and reads a patch source from)."""
        return self.written_as or self.name

    @property
    def is_vision(self) -> bool:
        return self.site.module in MODULE_ROLES_VISION


_READ_IN_ATTENTION = (
    "it is read inside the attention function; intervene on the projection "
    "(queries_{l} / keys_{l} / values_{l}) or on head_z / head_out instead"
)
_RUNNING_MEAN = "it is a running mean over examples, not a tensor of the forward"
_PROJECTED_VIEW = (
    "it is a view through W_O, not a tensor of the forward; intervene on the projection "
    "(queries_{l} / keys_{l}) instead"
)

KINDS: dict[str, PointKind] = {
    kind.name: kind
    for kind in (
        PointKind(
            "input_embeddings",
            "model",
            "[batch, pos, d_model]",
            "What enters layer 0: token (+ position) embeddings after any embedding scaling.",
            "extract_embed",
            Site("first_block", "input"),
        ),
        PointKind(
            "resid_in",
            "layer",
            "[batch, pos, d_model]",
            "Input of decoder layer l. Equals HF `output_hidden_states[l]`.",
            "extract_resid_in",
            Site("block", "input"),
            tl=TLAlias("hook_resid_pre"),
        ),
        PointKind(
            "resid_mid",
            "layer",
            "[batch, pos, d_model]",
            "Residual stream between the attention and MLP sub-blocks: `resid_in_l` plus what "
            "attention adds (not normalised). Absent in parallel-residual blocks (GPT-NeoX "
            "default), which raise.",
            "extract_resid_mid",
            Site("resid_mid_site", "input"),
            tl=TLAlias("hook_resid_mid"),
        ),
        PointKind(
            "resid_out",
            "layer",
            "[batch, pos, d_model]",
            "Output of layer l; equals `resid_in_{l+1}`.",
            "extract_resid_out",
            Site("block", "output"),
            tl=TLAlias("hook_resid_post"),
        ),
        PointKind(
            "attn_in",
            "layer",
            "[batch, pos, d_model]",
            "Input of the attention module (after the input norm, where there is one).",
            "extract_attn_in",
            Site("attention", "input"),
            tl=TLAlias("ln1.hook_out", same_on=_input_norm, where="families with an input norm"),
        ),
        PointKind(
            "resid_in_post_layernorm",
            "layer",
            "[batch, pos, d_model]",
            "Reference-design name of `attn_in_{l}`.",
            "extract_resid_in_post_layernorm",
            Site("attention", "input"),
            spelling_of="attn_in",
        ),
        PointKind(
            "attn_out",
            "layer",
            "[batch, pos, d_model]",
            "Output of the attention module (after the output projection; before the "
            "post-attention norm of sandwich-norm families Gemma2/3 and OLMo2).",
            "extract_attn_out",
            Site("attention", "output"),
            tl=TLAlias(
                "hook_attn_out",
                same_on=_no_post_attention_norm,
                where="families without a post-attention norm",
            ),
        ),
        PointKind(
            "attn_out_post_norm",
            "layer",
            "[batch, pos, d_model]",
            "Sandwich-norm families (Gemma2/3, OLMo2) only: `attn_out_l` through the "
            "post-attention norm, what attention adds to the residual stream "
            "(`resid_mid_l - resid_in_l`).",
            "extract_attn_out_post_norm",
            Site("attn_out_norm", "output"),
            tl=TLAlias(
                "hook_attn_out",
                same_on=_post_attention_norm,
                where="families with a post-attention norm",
            ),
        ),
        PointKind(
            "mlp_in",
            "layer",
            "[batch, pos, d_model]",
            "Input of the MLP (or mixture-of-experts) module (after the pre-MLP norm, where there "
            "is one): what a transcoder reads.",
            "extract_mlp_in",
            Site("mlp", "input"),
        ),
        PointKind(
            "mlp_out",
            "layer",
            "[batch, pos, d_model]",
            "Output of the MLP (or mixture-of-experts) module (before the post-feedforward norm "
            "of sandwich-norm families).",
            "extract_mlp_out",
            Site("mlp", "output"),
            tl=TLAlias(
                "hook_mlp_out",
                same_on=_no_post_feedforward_norm,
                where="families without a post-feedforward norm",
            ),
        ),
        PointKind(
            "mlp_out_post_norm",
            "layer",
            "[batch, pos, d_model]",
            "Sandwich-norm families only: `mlp_out_l` through the post-feedforward norm, what "
            "the MLP adds to the residual stream (`resid_out_l - resid_mid_l`).",
            "extract_mlp_out_post_norm",
            Site("mlp_out_norm", "output"),
            tl=TLAlias(
                "hook_mlp_out",
                same_on=_post_feedforward_norm,
                where="families with a post-feedforward norm",
            ),
        ),
        PointKind(
            "queries",
            "layer",
            "[batch, pos, n_heads*d_head]",
            "Query projection output, flat (before rotary embedding and any q-norm).",
            "extract_queries",
            Site("q_proj", "output"),
            width="n_heads*d_head",
        ),
        PointKind(
            "keys",
            "layer",
            "[batch, pos, n_kv_heads*d_head]",
            "Key projection output, flat (before rotary embedding and any k-norm).",
            "extract_keys",
            Site("k_proj", "output"),
            width="n_kv_heads*d_head",
        ),
        PointKind(
            "values",
            "layer",
            "[batch, pos, n_kv_heads*d_head]",
            "Value projection output, flat.",
            "extract_values",
            Site("v_proj", "output"),
            width="n_kv_heads*d_head",
        ),
        PointKind(
            "last_layernorm",
            "model",
            "[batch, pos, d_model]",
            "Output of the final norm (what the unembedding reads).",
            "extract_last_layernorm",
            Site("final_norm", "output"),
        ),
        PointKind(
            "logits",
            "model",
            "[batch, pos, vocab]",
            "Model logits at the target positions (on by default).",
            "save_logits",
            Site("model_output"),
            width="vocab",
            not_writable="it is the model's output",
        ),
        PointKind(
            "input_ids",
            "model",
            "[batch, seq]",
            "The token ids as given (all tokens).",
            "save_input_ids",
            Site("model_input"),
            width="",
            not_writable="it is the model's input",
        ),
        PointKind(
            "pattern",
            "head",
            "[batch, rows, P]",
            "Post-softmax attention probabilities of head h: rows = query positions (the "
            "targets, or `attn_pattern_row_positions`), columns = the target key positions, or "
            "every key with `attn_pattern_all_keys` (`[batch, rows, seq]`, padded keys 0). "
            "Equals eager `output_attentions`.",
            "extract_attn_pattern",
            ATTENTION_FUNCTION,
            width="",
            not_writable="edit attention patterns with hookscope.PatternEdit(layer=l, heads=[h], ...)",
            request="pattern",
            tl=TLAlias("attn.hook_pattern", head_axis=1),
        ),
        PointKind(
            "avg_pattern",
            "head",
            "[rows, P]",
            "Running mean of the pattern over every example seen (padded cells excluded, "
            "counts in `cache.running_count(key)`).",
            "extract_avg_attn_pattern",
            Site("running_mean"),
            width="",
            not_writable=_RUNNING_MEAN,
            averages="pattern",
        ),
        PointKind(
            "head_queries",
            "head",
            "[batch, P, d_head]",
            "The query vector of head h as the kernel receives it (after any q-norm and rotary "
            "embedding).",
            "extract_head_queries",
            ATTENTION_FUNCTION,
            width="d_head",
            not_writable=_READ_IN_ATTENTION,
            request="queries",
            tl=TLAlias("attn.hook_rot_q", head_axis=2, same_on=_rotary, where="rotary models"),
        ),
        PointKind(
            "head_keys",
            "head",
            "[batch, P, d_head]",
            "The key vector head h reads: its KV group's under grouped-query attention, after "
            "any k-norm and rotary embedding.",
            "extract_head_keys",
            ATTENTION_FUNCTION,
            width="d_head",
            not_writable=_READ_IN_ATTENTION,
            request="keys",
        ),
        PointKind(
            "head_values",
            "head",
            "[batch, P, d_head]",
            "The value vector head h reads (its KV group's).",
            "extract_head_values",
            ATTENTION_FUNCTION,
            width="d_head",
            not_writable=_READ_IN_ATTENTION,
            request="values",
        ),
        PointKind(
            "head_z",
            "head",
            "[batch, P, d_head]",
            "Head h's slice of the output-projection input; equals `pattern @ head_values`.",
            "extract_head_z",
            Site("o_proj", "input", "head"),
            width="d_head",
            tl=TLAlias("attn.hook_z", head_axis=2),
        ),
        PointKind(
            "head_out",
            "head",
            "[batch, P, d_model]",
            "Head h's contribution: `head_z @ W_O[:, h]^T`; summed over heads it is `attn_out` "
            "minus the output-projection bias.",
            "extract_head_out",
            Site("o_proj", "input", "head @ W_O"),
            written_as="head_z",
        ),
        PointKind(
            "projected_value",
            "head",
            "[batch, P, d_model]",
            "Each position's value vector through head h's block of `W_O`.",
            "extract_values_vectors_projected",
            ATTENTION_FUNCTION,
            not_writable=_READ_IN_ATTENTION,
            request="projected_values",
        ),
        PointKind(
            "projected_query",
            "head",
            "[batch, P, d_model]",
            "Head h's query vector as the query projection outputs it (before rotary embedding "
            "and any q-norm) through head h's block of `W_O` (easyroutine's projected query; "
            "without the output-projection bias, as `projected_value`).",
            "extract_head_queries_projected",
            Site("q_proj", "output", "head @ W_O"),
            not_writable=_PROJECTED_VIEW,
        ),
        PointKind(
            "projected_key",
            "head",
            "[batch, P, d_model]",
            "The key vector head h reads (its KV group's, as the key projection outputs it: "
            "before rotary embedding and any k-norm) through head h's block of `W_O` "
            "(easyroutine's projected key; without the output-projection bias).",
            "extract_head_keys_projected",
            Site("k_proj", "output", "head @ W_O"),
            not_writable=_PROJECTED_VIEW,
        ),
        PointKind(
            "avg_projected_value",
            "head",
            "[P, d_model]",
            "Running mean of `projected_value` over every example seen.",
            "extract_avg_values_vectors_projected",
            Site("running_mean"),
            not_writable=_RUNNING_MEAN,
            averages="projected_value",
        ),
        PointKind(
            "vision_resid_out",
            "layer",
            "[images, patches, d_vision]",
            "(vision-language models, layers in `vision_layers`) Output of block l of the "
            "vision encoder: the whole tensor, no position axis (Pixtral: `[1, patches of all "
            "images, d]`; Qwen2-VL: `[patches of all images, d]`). Equals the input of block l+1.",
            "extract_vision_resid_out",
            Site("vision_block", "output"),
            width="d_vision",
        ),
        PointKind(
            "vision_attn_out",
            "layer",
            "[images, patches, d_vision]",
            "Output of the attention module of vision block l.",
            "extract_vision_attn_out",
            Site("vision_attention", "output"),
            width="d_vision",
        ),
        PointKind(
            "projector_out",
            "model",
            "[images, image_tokens, d_model]",
            "The image features in the language model's space: flattened, equals `resid_in_0` "
            'at `"all-image"` (Llava-NeXt adds its `image_newline` rows first; Qwen2-VL: '
            "`[image_tokens of all images, d_model]`).",
            "extract_projector_out",
            Site("projector", "output"),
        ),
    )
}

_WIDTHS: dict[str, Callable[[ModelMap], int]] = {
    "d_model": lambda m: m.d_model,
    "d_head": lambda m: m.d_head,
    "n_heads*d_head": lambda m: m.n_heads * m.d_head,
    "n_kv_heads*d_head": lambda m: m.n_kv_heads * m.d_head,
}


def width_of(kind: str, model_map: ModelMap) -> int:
    """The size of the last axis of ``kind``'s tensor on this model (text points with a
    vector per slot).

    Raises:
        ActivationPointError: for a kind whose last axis is no model dimension (patterns, ids).
    """
    width = KINDS[kind].width
    if width not in _WIDTHS:
        raise ActivationPointError(f"{kind} has no vector width on a text model ({width!r}).")
    return _WIDTHS[width](model_map)


# -- TransformerLens aliases (derived) -------------------------------------------------------
# hook -> the (kind, alias) rows that name it, in table order.
TL_ALIASES: dict[str, list[tuple[str, TLAlias]]] = {}
for _kind in KINDS.values():
    if _kind.tl is not None:
        TL_ALIASES.setdefault(_kind.tl.hook, []).append((_kind.name, _kind.tl))

# Kept for compatibility: the kind each one-point hook names on pre-norm families (Llama-like),
# and each all-heads hook -> (per-head kind, TransformerLens's head axis). For one model, use
# :func:`tl_hooks`.
TL_LAYER_HOOKS: dict[str, str] = {
    hook: rows[0][0] for hook, rows in TL_ALIASES.items() if rows[0][1].head_axis is None
}
TL_HEAD_HOOKS: dict[str, tuple[str, int]] = {
    hook: (rows[0][0], rows[0][1].head_axis)
    for hook, rows in TL_ALIASES.items()
    if rows[0][1].head_axis is not None
}
_TL_NAME = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<hook>.+)$")


@dataclass(frozen=True)
class TLName:
    """A TransformerLens hook name, translated: ``head_axis`` is None for one-point hooks, else
    the axis along which the per-head points of ``kind`` stack into TransformerLens's layout."""

    kind: str
    layer: int
    head_axis: int | None = None
    hook: str = ""


def tl_kind(hook: str, model_map: ModelMap | None = None) -> tuple[str, int | None]:
    """``(kind, head_axis)`` that TransformerLens's ``blocks.{l}.{hook}`` is on this model.

    Raises:
        ActivationPointError: for a hook with no hookscope equivalent; one whose definition on
            this model's family differs from every hookscope kind; or, without ``model_map``,
            one whose meaning depends on the family.
    """
    rows = TL_ALIASES.get(hook)
    if rows is None:
        supported = [f"blocks.{{l}}.{h}" for h in TL_ALIASES]
        raise ActivationPointError(
            f"TransformerLens hook 'blocks.{{l}}.{hook}' has no hookscope equivalent. "
            f"Supported: {choices(supported)}."
        )
    meanings = "; ".join(f"{kind} on {alias.where}" for kind, alias in rows if alias.conditional)
    if model_map is None:
        if len(rows) == 1 and not rows[0][1].conditional:
            return rows[0][0], rows[0][1].head_axis
        raise ActivationPointError(
            f"TransformerLens hook 'blocks.{{l}}.{hook}' has a hookscope equal that depends on the "
            f"family ({meanings}): resolve it with the model (HookedModel.forward(names=...), "
            "parse_point(name, hm.model_map)) or use the hookscope key."
        )
    for kind, alias in rows:
        if alias.same_on(model_map):
            return kind, alias.head_axis
    unknown = " (its spec was discovered, not in hookscope's table)" if model_map.discovered else ""
    raise ActivationPointError(
        f"TransformerLens hook 'blocks.{{l}}.{hook}' has no equal on {model_map.model_type}"
        f"{unknown}: hookscope gives it only where TransformerLens's definition holds "
        f"({meanings}); use a hookscope key (hookscope info lists them)."
    )


def tl_hooks(model_map: ModelMap) -> dict[str, tuple[str, int | None]]:
    """Every TransformerLens hook that has an equal on this model -> ``(kind, head_axis)``."""
    found = {}
    for hook in TL_ALIASES:
        try:
            found[hook] = tl_kind(hook, model_map)
        except ActivationPointError:
            continue
    return found


def parse_tl_name(name: str, model_map: ModelMap | None = None) -> TLName | None:
    """Translate a TransformerLens hook name; None when ``name`` is not of the ``blocks.`` form.
    ``model_map`` is needed for names whose meaning depends on the family (see :func:`tl_kind`).

    Raises:
        ActivationPointError: a ``blocks.{l}.`` name with no hookscope equivalent on this model.
    """
    match = _TL_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        return None
    kind, axis = tl_kind(match["hook"], model_map)
    return TLName(kind, int(match["layer"]), axis, match["hook"])


def recorded_tl_name(
    name: str, recorded: dict[str, tuple[str, int | None]] | None
) -> TLName | None:
    """:func:`parse_tl_name` for a model known by its resolved hooks (``tl_hooks(model_map)``,
    what an ActivationCache records); with ``recorded`` None, only family-independent names."""
    match = _TL_NAME.match(name) if isinstance(name, str) else None
    if match is None or recorded is None:
        return parse_tl_name(name)
    hook = match["hook"]
    if hook not in TL_ALIASES:
        tl_kind(hook)  # raises, listing the supported hooks
    if hook not in recorded:
        rows = "; ".join(f"{kind} on {alias.where}" for kind, alias in TL_ALIASES[hook])
        raise ActivationPointError(
            f"TransformerLens hook {name!r} has no equal on the model this cache was taken from "
            f"(hookscope gives it as {rows}); read a hookscope key instead."
        )
    kind, axis = recorded[hook]
    return TLName(kind, int(match["layer"]), axis, hook)


_LAYER_NAME = re.compile(r"^(?P<kind>[a-z_]+?)_(?P<layer>\d+)$")
_HEAD_NAME = re.compile(r"^(?P<kind>[a-z_]+?)_L(?P<layer>\d+)H(?P<head>\d+)$")


def point_key(kind: str, layer: int | None = None, head: int | None = None) -> str:
    """The cache key of one point, the only place keys are spelled: ``resid_out_3``,
    ``pattern_L2H5`` or ``input_embeddings``. :func:`parse_point` is its inverse."""
    if head is not None:
        return f"{kind}_L{layer}H{head}"
    if layer is not None:
        return f"{kind}_{layer}"
    return kind


@dataclass(frozen=True)
class Point:
    """One activation point: a kind, plus a layer (and a head) where the kind has one."""

    kind: str
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        """The cache key (see :func:`point_key`)."""
        return point_key(self.kind, self.layer, self.head)

    def __str__(self) -> str:
        return self.name


#: Other libraries' point names (registered by :mod:`hookscope.compat`): each takes a name and
#: returns hookscope's cache key for it, or None when the name is not its.
POINT_ALIASES: list[Callable[[str], str | None]] = []


def point_alias(name: str) -> str | None:
    """hookscope's key for another library's point name (``queries_L3`` -> ``queries_3``), or
    None when no registered alias knows ``name``."""
    for alias in POINT_ALIASES:
        if (key := alias(name)) is not None:
            return key
    return None


def parse_point(name: str, model_map: ModelMap | None = None) -> Point:
    """Parse a cache key (or a TransformerLens hook name of one point) into a :class:`Point`.
    ``model_map`` resolves TransformerLens names whose meaning depends on the family.

    Raises:
        ActivationPointError: for a malformed name or an unknown kind (listing the valid kinds),
            or a TransformerLens name with no equal on this model (see :func:`tl_kind`).
    """
    if not isinstance(name, str):
        raise ActivationPointError(f"activation point names are strings, got {name!r}.")
    name = point_alias(name) or name
    if (tl := parse_tl_name(name, model_map)) is not None:
        if tl.head_axis is not None:
            raise ActivationPointError(
                f"{name!r} holds every head of layer {tl.layer}: name one head here "
                f"({point_key(tl.kind, tl.layer, 0)}, ...); a cache reads {name!r} as the heads "
                "stacked."
            )
        return Point(tl.kind, tl.layer)
    if name in KINDS and KINDS[name].scope == "model":
        return Point(name)
    if (match := _HEAD_NAME.match(name)) and match["kind"] in KINDS:
        return Point(match["kind"], int(match["layer"]), int(match["head"]))
    if (match := _LAYER_NAME.match(name)) and match["kind"] in KINDS:
        return Point(match["kind"], int(match["layer"]))
    scoped = {
        scope: [k for k, v in KINDS.items() if v.scope == scope]
        for scope in ("model", "layer", "head")
    }
    raise ActivationPointError(
        f"unknown activation point {name!r}. Valid: {choices(scoped['model'])}; "
        f"'{{kind}}_{{layer}}' with kind in {choices(scoped['layer'])}; or "
        f"'{{kind}}_L{{layer}}H{{head}}' with kind in {choices(scoped['head'])}."
    )


def check_layer(layer: int, n_layers: int, what: str = "layer") -> None:
    """Raise a clear error when ``layer`` is not in ``0..n_layers-1``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ActivationPointError(
            f"{what} {layer!r} is out of range: this model has {n_layers} layers (valid 0..{n_layers - 1})."
        )


def readme_table() -> str:
    """The README's activation-point table, rendered from :data:`KINDS` (tests/test_docs.py
    checks that the README holds exactly this)."""
    template = {"model": "`{k}`", "layer": "`{k}_{{l}}`", "head": "`{k}_L{{l}}H{{h}}`"}
    lines = [
        "| key | shape | flag | TransformerLens | definition |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in KINDS.values():
        tl = ""
        if kind.tl is not None:
            tl = f"`blocks.{{l}}.{kind.tl.hook}`"
            notes = ["all heads stacked"] if kind.tl.head_axis is not None else []
            notes += [kind.tl.where] if kind.tl.where else []
            tl += f" ({'; '.join(notes)})" if notes else ""
        key = template[kind.scope].format(k=kind.name)
        lines.append(f"| {key} | `{kind.shape}` | `{kind.flag}` | {tl} | {kind.definition} |")
    return "\n".join(lines)
