"""Tiny random models of every supported family, built from config classes (no download),
and a BPE tokenizer trained offline. Each builds and runs in milliseconds."""

from __future__ import annotations

import functools

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
PAD, BOS, EOS = 0, 1, 2
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
_SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])

# family -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
    "mixtral": (
        tf.MixtralConfig,
        tf.MixtralForCausalLM,
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
    "qwen3_moe": (
        tf.Qwen3MoeConfig,
        tf.Qwen3MoeForCausalLM,
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {}),
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        # a small softcap so that capping changes the scores measurably
        {**_SLIDING, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0},
    ),
    "gemma3_text": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        {**_SLIDING, "query_pre_attn_scalar": 16},
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, {}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "gpt2": (
        tf.GPT2Config,
        tf.GPT2LMHeadModel,
        {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 128,
            "vocab_size": VOCAB,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
        },
    ),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {"use_parallel_residual": True}),
    "gpt_neox_sequential": (
        tf.GPTNeoXConfig,
        tf.GPTNeoXForCausalLM,
        {"use_parallel_residual": False},
    ),
}
# Families whose kernel must stay eager (Gemma2 rejects SDPA in transformers 5).
EAGER_ONLY = {"gemma2"}
# The input norm of each family's layer (None: the attention reads resid_in directly).
INPUT_NORM = {
    **{f: "input_layernorm" for f in FAMILIES},
    "gpt2": "ln_1",
    "olmo2": None,
}


def build_config(family: str):
    config_cls, _, extra = FAMILIES[family]
    kwargs = dict(extra) if family == "gpt2" else {**_COMMON, **extra}
    return config_cls(**kwargs)


def build_model(family: str, attn_implementation: str | None = None, seed: int = 0):
    """A tiny model with a seeded random init (larger than HF's, so errors do not hide)."""
    _, model_cls, _ = FAMILIES[family]
    attn = attn_implementation or ("eager" if family in EAGER_ONLY else "sdpa")
    torch.manual_seed(seed)
    model = model_cls._from_config(build_config(family), attn_implementation=attn)
    return randomize(model, seed).eval()


def randomize(model, seed: int = 0):
    """Seeded random weights, larger than HF's init so that errors do not hide in tiny values:
    matrices and biases ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1). Returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            else:
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.1)
    return model


_CORPUS = [
    "The cat sat on the mat and looked at the dog.",
    "A quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Interpretability research looks inside neural networks.",
    "Hello world! Numbers like 12345 and symbols like #@! are tokens too.",
]


@functools.cache
def build_tokenizer(padding_side: str = "right") -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences; ids 0/1/2 are <pad>/<s>/</s>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 10,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    wrapped = tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.padding_side = padding_side
    return wrapped


PROMPTS = [
    "The cat sat on the mat",
    "A dog barked",
    "The capital of France is Paris and the capital",
    "Hello world",
]


def patching_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A clean / corrupt pair of 2 examples of one token length (no padding): the second example
    differs from the first at position 3, and the corrupt run differs at position 1."""
    tokenizer = build_tokenizer()
    ids = tokenizer(["The cat sat on the mat"], return_tensors="pt")["input_ids"]
    clean = {
        "input_ids": ids.repeat(2, 1),
        "attention_mask": torch.ones(2, ids.shape[1], dtype=torch.long),
    }
    clean["input_ids"][1, 3] = 50
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][:, 1] = torch.tensor([100, 120])
    return clean, corrupt
