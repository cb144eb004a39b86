"""The resolved architecture of one loaded model: real modules, dimensions and their paths."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ArchitectureError
from .discovery import discover_spec
from .specs import SPECS, ArchSpec


@dataclass
class LayerParts:
    """The modules of one decoder layer. Optional parts are ``None`` where the family has none."""

    block: nn.Module
    attention: nn.Module
    mlp: nn.Module
    resid_mid_site: nn.Module | None
    attn_out_norm: nn.Module | None
    mlp_out_norm: nn.Module | None


@dataclass
class ModelMap:
    """Where everything lives in one model, plus its dimensions.

    Attributes:
        model_type: the HF ``model_type`` of the text model.
        spec: the :class:`ArchSpec` used (from the table, or discovered).
        discovered: True when the spec came from structural discovery, not the table.
        decoder: the text decoder (``model.get_decoder()``), e.g. ``LlamaModel``.
        layers: one :class:`LayerParts` per decoder layer.
        final_norm, embed: the final norm and the token embedding modules.
        n_layers, n_heads, n_kv_heads, d_model, d_head: dimensions from the config.
        parallel_residual: True when attention and MLP read the same input (no ``resid_mid``).
    """

    model_type: str
    spec: ArchSpec
    discovered: bool
    decoder: nn.Module
    layers: list[LayerParts]
    final_norm: nn.Module
    embed: nn.Module
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    parallel_residual: bool
    module_paths: dict[int, str] = field(repr=False, default_factory=dict)

    def path_of(self, module: nn.Module) -> str:
        """The dotted path of ``module`` inside the HF model (``model.layers.0.self_attn``)."""
        return self.module_paths.get(id(module), f"<{type(module).__name__}>")

    def attention_child(self, layer: int, attr: str | None, part: str) -> nn.Module:
        """A child of layer ``layer``'s attention module, or a clear error naming the part."""
        attention = self.layers[layer].attention
        module = getattr(attention, attr, None) if attr else None
        if module is None:
            raise ArchitectureError(
                f"{self.model_type}: no {part} found in {self.path_of(attention)} "
                f"(children: {[n for n, _ in attention.named_children()]})."
            )
        return module


def _child(parent: nn.Module, attr: str | None) -> nn.Module | None:
    return getattr(parent, attr, None) if attr else None


def _out_features(module: nn.Module | None) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out] and has nf = out.
    return getattr(module, "nf", None) or weight.shape[0]


def _count_kv_heads(attention: nn.Module, spec: ArchSpec, n_heads: int, d_head: int) -> int | None:
    """KV heads as the weights say (configs can carry an unused num_key_value_heads)."""
    if spec.qkv_proj is not None:
        if spec.qkv_layout == "neox":
            return n_heads
        fused = _out_features(getattr(attention, spec.qkv_proj, None))
        return (fused - n_heads * d_head) // (2 * d_head) if fused else None
    keys = _out_features(_child(attention, spec.k_proj))
    return keys // d_head if keys else None


def _layer_parts(
    decoder: nn.Module, spec: ArchSpec, n_layers: int, model_type: str
) -> list[LayerParts]:
    """The parts of each of the decoder's first ``n_layers`` layers, as ``spec`` names them.

    Raises:
        ArchitectureError: for a missing layer list, attention or MLP (naming the children).
    """
    layer_list = getattr(decoder, spec.layers, None)
    if not isinstance(layer_list, nn.ModuleList):
        raise ArchitectureError(
            f"{model_type}: expected the decoder layers at {type(decoder).__name__}.{spec.layers}, "
            f"found {type(layer_list).__name__}."
        )
    layers = []
    for index, block in enumerate(layer_list[:n_layers]):
        attention, mlp = _child(block, spec.attention), _child(block, spec.mlp)
        if attention is None or mlp is None:
            missing = spec.attention if attention is None else spec.mlp
            raise ArchitectureError(
                f"{model_type}: layer {index} ({type(block).__name__}) has no child {missing!r} "
                f"(children: {[n for n, _ in block.named_children()]})."
            )
        layers.append(
            LayerParts(
                block=block,
                attention=attention,
                mlp=mlp,
                resid_mid_site=_child(block, spec.resid_mid_site),
                attn_out_norm=_child(block, spec.attn_out_norm),
                mlp_out_norm=_child(block, spec.mlp_out_norm),
            )
        )
    return layers


def resolve_architecture(model: nn.Module) -> ModelMap:
    """Find the decoder stack of ``model`` (an HF PreTrainedModel) and resolve its parts.

    Raises:
        ArchitectureError: naming the part that could not be found.
    """
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", type(model).__name__)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise ArchitectureError(
            f"{type(model).__name__} has no get_decoder(): hookscope could not find its text decoder."
        )
    n_layers = config.num_hidden_layers
    spec, discovered = SPECS.get(model_type), False
    if spec is None:
        spec, discovered = discover_spec(decoder, n_layers, model_type), True

    layers = _layer_parts(decoder, spec, n_layers, model_type)
    final_norm, embed = _child(decoder, spec.final_norm), _child(decoder, spec.embed)
    for part, module in (("final norm", final_norm), ("token embedding", embed)):
        if module is None:
            raise ArchitectureError(
                f"{model_type}: no {part} found in {type(decoder).__name__} "
                f"(children: {[n for n, _ in decoder.named_children()]})."
            )

    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    parallel = bool(
        spec.parallel_residual_flag and getattr(config, spec.parallel_residual_flag, False)
    )
    return ModelMap(
        model_type=model_type,
        spec=spec,
        discovered=discovered,
        decoder=decoder,
        layers=layers,
        final_norm=final_norm,
        embed=embed,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_count_kv_heads(layers[0].attention, spec, n_heads, d_head)
        or getattr(config, "num_key_value_heads", None)
        or n_heads,
        d_model=d_model,
        d_head=d_head,
        parallel_residual=parallel,
        module_paths={id(m): name for name, m in model.named_modules()},
    )
