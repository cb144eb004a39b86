"""What vision-language models need from hookscope: their image token, the processor fields
each family requires, and the fields hookscope can derive when a caller left them out.

Every rule here is read from the model's own config (``image_token_id`` /
``image_token_index``, ``video_token_id``) and the named parameters of its ``forward``; the table
below only names the fields a family cannot run correctly without.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError

# model_type -> processor outputs the model cannot do without, when pixel_values are given
REQUIRED_WITH_PIXELS: dict[str, tuple[str, ...]] = {
    "llava_next": ("image_sizes",),
    "mistral3": ("image_sizes",),
    "qwen2_vl": ("image_grid_thw",),
    "qwen2_5_vl": ("image_grid_thw",),
}
# model_type -> how a missing token_type_ids is derived: "image" (1 at image tokens, Gemma3's
# bidirectional image blocks) or "prefix" (all 0: the whole prompt is PaliGemma's prefix)
TOKEN_TYPES: dict[str, str] = {"gemma3": "image", "paligemma": "prefix"}
PIXEL_FIELDS = ("pixel_values", "pixel_values_videos")
# model_type -> the position id of the first token, where it is not 0
FIRST_POSITION: dict[str, int] = {"paligemma": 1}


def image_token_id(config: Any) -> int | None:
    """The id of the token that stands for one image feature in ``input_ids``, or None."""
    token = getattr(config, "image_token_id", None)
    return token if token is not None else getattr(config, "image_token_index", None)


def computes_own_positions(accepted: frozenset[str]) -> bool:
    """True for models that derive (multimodal, 3-D) position ids from the attention mask and
    the image grid themselves (Qwen2-VL, Qwen2.5-VL): hookscope must not pass 1-D ones."""
    return "mm_token_type_ids" in accepted


# model_type -> how the processor's image token sits in a prompt, where it is not alone
PLACEHOLDER_TEMPLATES = {
    "qwen2_vl": "<|vision_start|>{image}<|vision_end|>",
    "qwen2_5_vl": "<|vision_start|>{image}<|vision_end|>",
}


def image_placeholder(processor: Any, config: Any) -> str:
    """The prompt text for one image: the processor's image token (Gemma3's processor names
    ``<start_of_image>`` so), in the family's template."""
    token = getattr(processor, "image_token", None) or getattr(processor, "boi_token", None)
    if token is None:
        raise InputError(f"the processor {type(processor).__name__} names no image token.")
    template = PLACEHOLDER_TEMPLATES.get(getattr(config, "model_type", ""), "{image}")
    return template.format(image=token)


def first_position(model: nn.Module) -> int:
    """The position id of a sequence's first token (PaliGemma counts from 1)."""
    return FIRST_POSITION.get(getattr(model.config, "model_type", ""), 0)


def prepare_multimodal(kwargs: dict[str, Any], model: nn.Module, accepted: frozenset[str]) -> None:
    """Check and complete the multimodal fields of ``kwargs`` in place.

    Derives ``mm_token_type_ids`` (Qwen2-VL and Qwen2.5-VL; without it Qwen2.5-VL silently falls
    back to 1-D positions) and a missing ``token_type_ids`` (Gemma3, PaliGemma) from the image
    token id, exactly as the processors make them.

    Raises:
        InputError: image tokens without ``pixel_values`` (the model would embed them as text),
            or ``pixel_values`` without a field the family needs (``image_grid_thw``, ...).
    """
    config = model.config
    token = image_token_id(config)
    if token is None:
        return
    ids = kwargs["input_ids"]
    image_tokens = ids == token
    has_pixels = any(kwargs.get(field) is not None for field in PIXEL_FIELDS)
    if not has_pixels:
        if bool(image_tokens.any()):
            raise InputError(
                f"input_ids contain {int(image_tokens.sum())} image token(s) (id {token}) but no "
                "pixel_values were given: pass the processor's whole output (the model would "
                "otherwise embed the image tokens as text)."
            )
        return
    model_type = getattr(config, "model_type", "")
    missing = [f for f in REQUIRED_WITH_PIXELS.get(model_type, ()) if kwargs.get(f) is None]
    if missing:
        raise InputError(
            f"{model_type} inputs with pixel_values need {', '.join(missing)}, which is missing: "
            "pass the processor's whole output, not only input_ids and pixel_values."
        )
    if "mm_token_type_ids" in accepted and kwargs.get("mm_token_type_ids") is None:
        types = image_tokens.int()
        video = getattr(config, "video_token_id", None)
        if video is not None:
            types = types.masked_fill(ids == video, 2)
        kwargs["mm_token_type_ids"] = types
    rule = TOKEN_TYPES.get(model_type)
    if rule and "token_type_ids" in accepted and kwargs.get("token_type_ids") is None:
        kwargs["token_type_ids"] = (
            image_tokens.long() if rule == "image" else torch.zeros_like(ids, dtype=torch.long)
        )


# -- the vision tower and the projector --------------------------------------------------------
VISION_TOWERS = ("vision_tower", "vision_model", "visual")
PROJECTORS = ("multi_modal_projector", "connector", "merger")
ATTENTION_CHILDREN = ("self_attn", "attention", "attn")


@dataclass
class VisionMap:
    """Where the vision side of a vision-language model lives.

    Attributes:
        tower_path: dotted path of the vision encoder (``model.vision_tower``).
        layers: its transformer blocks, in order (CLIP / SigLIP ``encoder.layers``, Pixtral
            ``transformer.layers``, Qwen2-VL ``blocks``).
        attention: each block's attention module.
        projector: the module that maps vision features into the language model's embedding
            space (``multi_modal_projector``, Idefics3's ``connector``, Qwen2-VL's ``merger``).
    """

    tower_path: str
    layers: list[nn.Module]
    attention: list[nn.Module]
    projector: nn.Module | None


def find_vision_map(model: nn.Module) -> VisionMap | None:
    """The :class:`VisionMap` of ``model``, found by structure, or None for a text-only model
    (or one whose image encoder is no transformer, such as Chameleon's VQ-VAE)."""
    modules = dict(model.named_modules())
    towers = [p for p in modules if p.rsplit(".", 1)[-1] in VISION_TOWERS]
    if not towers:
        return None
    tower_path = min(towers, key=len)
    stacks = [
        m
        for p, m in modules.items()
        if p.startswith(tower_path + ".") and isinstance(m, nn.ModuleList) and len(m) > 0
    ]
    if not stacks:
        return None
    layers = list(max(stacks, key=len))
    attention = []
    for block in layers:
        child = next((getattr(block, n) for n in ATTENTION_CHILDREN if hasattr(block, n)), None)
        attention.append(child)
    projectors = [p for p in modules if p.rsplit(".", 1)[-1] in PROJECTORS]
    projector = modules[min(projectors, key=len)] if projectors else None
    return VisionMap(tower_path, layers, attention, projector)


# -- several images per example ----------------------------------------------------------------
# model_type -> tokens that may sit between the image-token runs of ONE image ("joiners": rows
# of Pixtral patches, Idefics3 tiles) and tokens after which a run ends its image ("closers":
# Idefics3 puts the global view last)
_TILE_MARKERS = (
    "<fake_token_around_image>",
    "<global-img>",
    "\n",
    "Ċ",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
IMAGE_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mistral3": (("[IMG_BREAK]",), ()),
    "pixtral": (("[IMG_BREAK]",), ()),
    "idefics3": (_TILE_MARKERS, ("<global-img>",)),
    "smolvlm": (_TILE_MARKERS, ("<global-img>",)),
}


@dataclass(frozen=True)
class ImageLayout:
    """How image tokens form images in ``input_ids``: the image token, plus the ids that join
    the runs of one image and the ids that close an image (see :func:`number_images`)."""

    token: int
    joiners: tuple[int, ...] = ()
    closers: tuple[int, ...] = ()
    per_image: int | None = None  # fixed token count per image: splits adjacent images


def image_layout(config: Any, tokenizer: Any) -> ImageLayout | None:
    """The :class:`ImageLayout` of a model (None without an image token); marker ids come from
    the tokenizer's vocabulary."""
    token = image_token_id(config)
    if token is None:
        return None
    joiners, closers = IMAGE_LAYOUTS.get(getattr(config, "model_type", ""), ((), ()))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}

    def ids(tokens: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(sorted({vocab[t] for t in tokens if t in vocab}))

    return ImageLayout(token, ids(joiners), ids(closers), _tokens_per_image(config))


def _tokens_per_image(config: Any) -> int | None:
    """Image tokens per image where the family fixes it (Llava, PaliGemma): a processor puts
    adjacent images' tokens in one run, which this count splits."""
    model_type = getattr(config, "model_type", "")
    vision = getattr(config, "vision_config", None)
    if model_type not in ("llava", "paligemma") or vision is None:
        return None
    patches = (vision.image_size // vision.patch_size) ** 2
    if model_type == "llava" and getattr(config, "vision_feature_select_strategy", "") == "full":
        patches += 1  # the CLS token is kept
    return patches


def number_images(input_ids: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
    """``[batch, seq]`` long: k at the image tokens of the row's k-th image (0-based, in order),
    -1 elsewhere.

    An image is a maximal run of image tokens, joined with the next run when only ``joiners``
    sit between them (Pixtral's ``[IMG_BREAK]`` rows, Idefics3's tiles), unless a ``closers``
    token directly precedes the run (Idefics3's ``<global-img>`` view ends an image).
    """
    ids = input_ids.detach().to("cpu")
    is_image = ids == layout.token
    numbers = torch.full_like(ids, -1)
    joiner = torch.isin(ids, torch.tensor(layout.joiners, dtype=ids.dtype)) & ~is_image
    # count of tokens that separate images (neither image tokens nor joiners) up to each index
    breaks = torch.cumsum((~is_image & ~joiner).long(), dim=1)
    previous = torch.nn.functional.pad(is_image[:, :-1], (1, 0))
    following = torch.nn.functional.pad(is_image[:, 1:], (0, 1))
    for row in range(ids.shape[0]):
        starts = torch.nonzero(is_image[row] & ~previous[row]).flatten().tolist()
        ends = torch.nonzero(is_image[row] & ~following[row]).flatten().tolist()
        count, open_end = -1, None
        for start, end in zip(starts, ends, strict=True):
            joins = open_end is not None and int(breaks[row, start]) == int(breaks[row, open_end])
            count += 0 if joins else 1
            length = end + 1 - start
            if layout.per_image and length > layout.per_image and length % layout.per_image == 0:
                chunk = torch.arange(length) // layout.per_image  # adjacent images, one run
                numbers[row, start : end + 1] = count + chunk
                count += int(chunk[-1])
            else:
                numbers[row, start : end + 1] = count
            closed = start > 0 and int(ids[row, start - 1]) in layout.closers
            open_end = None if closed else end
    return numbers
