"""Tiny random vision-language models of every supported family, each with a processor built
offline (a BPE tokenizer trained here plus the family's image processor at 32 x 32 pixels).

``build_vlm(family)`` returns a :class:`TinyVLM`: the model (eval, seeded), its processor and
what a test needs to make inputs. Images are generated arrays (``image(seed)``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers as tf
from tiny_models import _COMMON, _CORPUS, _SLIDING, randomize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT_VOCAB = 448
IMAGE_SIZE = 32
# the tiny text stack of tiny_models, with room for the image tokens and longer prompts
_TEXT = {**_COMMON, "vocab_size": TEXT_VOCAB, "max_position_embeddings": 512}
_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=8,
)
_SIGLIP_PROCESSOR = dict(
    size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)


@dataclass
class TinyVLM:
    """A tiny vision-language model and what it takes to call it."""

    family: str
    model: Any
    processor: Any
    prompt: str  # a text with one image placeholder, as users write it for this family

    def inputs(self, texts: list[str], images: list[list[Any]], padding_side: str = "left"):
        """Processor outputs for ``texts`` (each with its image placeholders) and ``images``
        (a list of images per text)."""
        self.processor.tokenizer.padding_side = padding_side
        return self.processor(text=texts, images=images, return_tensors="pt", padding=True)


class PlaceholderProcessor:
    """What the family's own processor does, for the processors that need torchvision (which
    does not install beside the CPU torch here: PixtralProcessor, Qwen2VLProcessor,
    SmolVLMProcessor): run the image processor, then replace each placeholder in the text by
    the image's token sequence, whose length comes from the image processor's output."""

    def __init__(self, image_processor, tokenizer, placeholder: str, expand, mm_types=False):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = placeholder
        self._expand = expand  # (image processor output, image index) -> replacement text
        self._mm_types = mm_types  # add mm_token_type_ids (1 at image tokens), as Qwen2-VL's does

    def __call__(self, text, images, return_tensors="pt", padding=True):
        flat = [picture for row in images for picture in row]
        pixels = self.image_processor(flat, return_tensors=return_tensors)
        expanded, index = [], 0
        for sample in text:
            pieces = sample.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self._expand(pixels, index) + piece
                index += 1
            expanded.append(out)
        encoded = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding)
        if self._mm_types:
            image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            encoded["mm_token_type_ids"] = (encoded["input_ids"] == image_id).int()
        return tf.BatchFeature({**encoded, **pixels})


def image(seed: int, size: int = IMAGE_SIZE):
    """A random RGB image (PIL) generated from ``seed``."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@functools.cache
def _tokenizer(specials: tuple[str, ...], named: tuple[tuple[str, str], ...]):
    """A byte-level BPE with ``specials`` as special tokens; ``named`` sets tokenizer attributes
    such as ``image_token`` (and with them ``image_token_id``)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300 + len(specials),
        special_tokens=["<pad>", "<s>", "</s>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    wrapped = tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=dict(named),
    )
    assert len(wrapped) <= TEXT_VOCAB, len(wrapped)
    return wrapped


def _token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def _seeded(model_cls, config, seed: int = 0):
    torch.manual_seed(seed)
    return randomize(model_cls._from_config(config, attn_implementation="sdpa"), seed).eval()


# -- families ---------------------------------------------------------------------------------
def _llava(next_: bool = False) -> TinyVLM:
    tok = _tokenizer(("<image>",), (("image_token", "<image>"),))
    text = tf.LlamaConfig(**_TEXT)
    vision = tf.CLIPVisionConfig(**_VISION)
    kwargs = dict(
        text_config=text,
        vision_config=vision,
        image_token_id=_token_id(tok, "<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    image_processor = tf.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    if not next_:
        processor = tf.LlavaProcessor(
            image_processor,
            tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        model = _seeded(tf.LlavaForConditionalGeneration, tf.LlavaConfig(**kwargs))
        return TinyVLM("llava", model, processor, "<image>\nWhat is in the picture?")
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE]]
    config = tf.LlavaNextConfig(**kwargs, image_grid_pinpoints=pinpoints)
    image_processor = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints,
    )
    processor = tf.LlavaNextProcessor(
        image_processor,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model = _seeded(tf.LlavaNextForConditionalGeneration, config)
    return TinyVLM("llava_next", model, processor, "<image>\nWhat is in the picture?")


def _paligemma() -> TinyVLM:
    tok = _tokenizer(("<image>",), (("image_token", "<image>"),))
    text = tf.GemmaConfig(**_TEXT)
    vision = tf.SiglipVisionConfig(**_VISION, projection_dim=64)
    config = tf.PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=_token_id(tok, "<image>"),
        projection_dim=64,
    )
    image_processor = tf.SiglipImageProcessorPil(**_SIGLIP_PROCESSOR)
    image_processor.image_seq_length = 16
    processor = tf.PaliGemmaProcessor(image_processor, tok)
    model = _seeded(tf.PaliGemmaForConditionalGeneration, config)
    return TinyVLM("paligemma", model, processor, "<image>What is in the picture?")


def _gemma3() -> TinyVLM:
    names = {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    }
    tok = _tokenizer(tuple(names.values()), tuple(names.items()))
    text = tf.Gemma3TextConfig(**_TEXT, **_SLIDING, query_pre_attn_scalar=16)
    vision = tf.SiglipVisionConfig(**_VISION)
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_id=_token_id(tok, "<image_soft_token>"),
        boi_token_index=_token_id(tok, "<start_of_image>"),
        eoi_token_index=_token_id(tok, "<end_of_image>"),
    )
    image_processor = tf.Gemma3ImageProcessorPil(**_SIGLIP_PROCESSOR)
    processor = tf.Gemma3Processor(image_processor, tok, image_seq_length=4)
    model = _seeded(tf.Gemma3ForConditionalGeneration, config)
    return TinyVLM("gemma3", model, processor, "<start_of_image>What is in the picture?")


def _mistral3() -> TinyVLM:
    tok = _tokenizer(("[IMG]", "[IMG_BREAK]", "[IMG_END]"), ())
    text = tf.MistralConfig(**_TEXT, sliding_window=None)
    vision = tf.PixtralVisionConfig(**_VISION, head_dim=16)
    config = tf.Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=_token_id(tok, "[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    image_processor = tf.PixtralImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE}, patch_size={"height": 8, "width": 8}
    )

    def expand(pixels, index):  # rows of [IMG] x cols, [IMG_BREAK] between rows, [IMG_END] last
        height, width = (int(v) // (8 * 2) for v in pixels["image_sizes"][index])
        return "[IMG_BREAK]".join(["[IMG]" * width] * height) + "[IMG_END]"

    processor = PlaceholderProcessor(image_processor, tok, "[IMG]", expand)
    model = _seeded(tf.Mistral3ForConditionalGeneration, config)
    return TinyVLM("mistral3", model, processor, "[IMG]What is in the picture?")


def _idefics3(smolvlm: bool = False) -> TinyVLM:
    rows = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
    specials = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows)
    tok = _tokenizer(specials, (("image_token", "<image>"),))
    text = tf.LlamaConfig(**_TEXT)
    vision_cls = tf.SmolVLMVisionConfig if smolvlm else tf.Idefics3VisionConfig
    vision = vision_cls(**_VISION)
    config_cls = tf.SmolVLMConfig if smolvlm else tf.Idefics3Config
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=_token_id(tok, "<image>"),
        scale_factor=2,
    )
    processor_kwargs = dict(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    # SmolVLMProcessor needs torchvision (its video processor); SmolVLM's image prompt format is
    # Idefics3's, so Idefics3Processor makes the same tokens.
    processor = tf.Idefics3Processor(
        tf.Idefics3ImageProcessorPil(**processor_kwargs), tok, image_seq_len=4
    )
    model_cls = (
        tf.SmolVLMForConditionalGeneration if smolvlm else tf.Idefics3ForConditionalGeneration
    )
    model = _seeded(model_cls, config)
    family = "smolvlm" if smolvlm else "idefics3"
    return TinyVLM(family, model, processor, "<image>What is in the picture?")


def _qwen2_vl(v2_5: bool = False) -> TinyVLM:
    names = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    specials = ("<|vision_start|>", "<|vision_end|>", *names.values())
    tok = _tokenizer(specials, tuple(names.items()))
    prefix = "Qwen2_5_VL" if v2_5 else "Qwen2VL"
    text = getattr(tf, f"{prefix}TextConfig")(
        **_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}
    )
    vision_kwargs = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    if v2_5:
        vision_kwargs = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            num_heads=2,
            intermediate_size=64,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=8,
            fullatt_block_indexes=[1],
        )
    vision = getattr(tf, f"{prefix}VisionConfig")(**vision_kwargs)
    config = getattr(tf, f"{prefix}Config")(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=_token_id(tok, "<|image_pad|>"),
        video_token_id=_token_id(tok, "<|video_pad|>"),
        vision_start_token_id=_token_id(tok, "<|vision_start|>"),
        vision_end_token_id=_token_id(tok, "<|vision_end|>"),
    )
    image_processor = tf.Qwen2VLImageProcessorPil(
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=IMAGE_SIZE * IMAGE_SIZE // 4,
        max_pixels=IMAGE_SIZE * IMAGE_SIZE,
    )

    def expand(pixels, index):  # one <|image_pad|> per merged 2 x 2 patch group
        count = int(pixels["image_grid_thw"][index].prod()) // 4
        return "<|image_pad|>" * count

    processor = PlaceholderProcessor(image_processor, tok, "<|image_pad|>", expand, mm_types=True)
    model_cls = (
        tf.Qwen2_5_VLForConditionalGeneration if v2_5 else tf.Qwen2VLForConditionalGeneration
    )
    model = _seeded(model_cls, config)
    family = "qwen2_5_vl" if v2_5 else "qwen2_vl"
    return TinyVLM(
        family,
        model,
        processor,
        "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?",
    )


def _chameleon() -> TinyVLM:
    """Chameleon: a VQ-VAE turns the image into discrete codes that replace the image tokens;
    there is no vision transformer (so no vision points)."""
    codes = 16
    # the vocabulary maps VQ code i to the token "IMGIMG<i in letters A-J>Z"
    code_tokens = tuple(
        "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z" for i in range(codes)
    )
    names = {"image_token": "<image>", "boi_token": "<racm3:break>", "eoi_token": "<eoss>"}
    tok = _tokenizer((*names.values(), *code_tokens), tuple(names.items()))
    vocab = tok.get_vocab()
    vq = tf.ChameleonVQVAEConfig(
        embed_dim=32,
        num_embeddings=codes,
        latent_channels=32,
        resolution=IMAGE_SIZE,
        base_channels=32,  # GroupNorm(32) needs multiples of 32
        channel_multiplier=[1, 1],  # one downsampling: 16 x 16 codes per image
        num_res_blocks=1,
        attn_resolutions=[],
    )
    text = {k: v for k, v in _TEXT.items() if k != "head_dim"}
    config = tf.ChameleonConfig(
        **text, vq_config=vq.to_dict(), vocabulary_map=vocab, image_token_id=vocab["<image>"]
    )
    image_processor = tf.ChameleonImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = tf.ChameleonProcessor(image_processor, tok, image_seq_length=(IMAGE_SIZE // 2) ** 2)
    model = _seeded(tf.ChameleonForConditionalGeneration, config)
    return TinyVLM("chameleon", model, processor, "<image>What is in the picture?")


VLM_FAMILIES = {
    "chameleon": _chameleon,
    "llava": _llava,
    "llava_next": functools.partial(_llava, next_=True),
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "mistral3": _mistral3,
    "idefics3": _idefics3,
    "smolvlm": functools.partial(_idefics3, smolvlm=True),
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": functools.partial(_qwen2_vl, v2_5=True),
}


def build_vlm(family: str) -> TinyVLM:
    """A tiny model of ``family`` with its offline processor."""
    return VLM_FAMILIES[family]()
