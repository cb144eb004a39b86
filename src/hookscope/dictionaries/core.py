"""A learned dictionary as data: a sparse autoencoder (SAE) or a transcoder.

A :class:`Dictionary` holds plain tensors (no ``nn.Module``, no pickle) and says which
activation point it reads and which it reconstructs:

- an **SAE** reads and reconstructs the same point (``reads == writes``, e.g. ``resid_out_6``);
- a **transcoder** reads one point and predicts another (``reads="mlp_in_3"``,
  ``writes="mlp_out_3"``): it stands in for the MLP.

Shapes (``d_in`` = width of ``reads``, ``d_sae`` = number of features, ``d_out`` = width of
``writes``)::

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_out]   b_dec [d_out]
    threshold [d_sae]     (JumpReLU, and BatchTopK at inference)

Encoding, for ``x [..., d_in]``::

    x' = x * input_scale                      (input normalisation; 1.0 when the format has none)
    pre = (x' - b_dec if subtract_decoder_bias else x') @ W_enc + b_enc
    f = activation(pre)                       [..., d_sae]

Decoding: ``x_hat = (f @ W_dec + b_dec) / input_scale`` ``[..., d_out]``.

Activations: ``relu``; ``topk`` (keep the ``k`` largest pre-activations per vector, ReLU'd);
``batchtopk`` (trained with a top-k over the whole batch; at inference a per-vector rule,
``pre > threshold`` when a threshold is stored, else per-vector top-k, so that a batched
forward equals one-by-one); ``jumprelu`` (``pre * (pre > threshold)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import HookscopeError

Activation = Literal["relu", "topk", "batchtopk", "jumprelu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass(eq=False)
class Dictionary:
    """Encoder/decoder weights of an SAE or transcoder and the points it reads and writes.

    Attributes:
        W_enc, b_enc, W_dec, b_dec: weights (shapes in the module docstring).
        activation: one of :data:`ACTIVATIONS`.
        reads: the hookscope point the encoder reads (e.g. ``"resid_out_6"``).
        writes: the point the decoder reconstructs; ``None`` means the same as ``reads`` (an SAE).
        k: features kept per vector for ``topk`` (and ``batchtopk`` without a threshold).
        threshold: ``[d_sae]`` for ``jumprelu`` (and ``batchtopk`` at inference), else ``None``.
        input_scale: multiply inputs by this before encoding, divide reconstructions after.
        subtract_decoder_bias: subtract ``b_dec`` from the input before encoding (SAELens'
            ``apply_b_dec_to_input``; always true for sparsify and for trained TopK SAEs).
        name: a short name used in cache keys (``features_{name}``); letters, digits, ``_``.
        metadata: anything the source format said (release, hook name, training stats).
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: Activation
    reads: str
    writes: str | None = None
    k: int | None = None
    threshold: torch.Tensor | None = None
    input_scale: float = 1.0
    subtract_decoder_bias: bool = True
    name: str = "sae"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.writes is None:
            self.writes = self.reads
        if self.activation not in ACTIVATIONS:
            raise HookscopeError(
                f"Dictionary activation {self.activation!r} is not one of {ACTIVATIONS}."
            )
        self._check_shapes()
        if self.activation == "topk" and not (isinstance(self.k, int) and self.k > 0):
            raise HookscopeError(f"activation='topk' needs k, a positive int; got k={self.k!r}.")
        if self.activation == "jumprelu" and self.threshold is None:
            raise HookscopeError("activation='jumprelu' needs threshold, a [d_sae] tensor.")
        if self.activation == "batchtopk" and self.threshold is None and self.k is None:
            raise HookscopeError("activation='batchtopk' needs a threshold or k for inference.")
        if not (self.name.replace("_", "").isalnum() and self.name.isascii()):
            raise HookscopeError(
                f"Dictionary name {self.name!r} must be letters, digits and '_' "
                "(it becomes part of cache keys such as features_{name})."
            )
        if not self.input_scale > 0:
            raise HookscopeError(f"input_scale must be > 0, got {self.input_scale!r}.")

    def _check_shapes(self) -> None:
        d_in, d_sae = self.W_enc.shape
        expected = {
            "b_enc": (self.b_enc, (d_sae,)),
            "W_dec": (self.W_dec, (d_sae, self.W_dec.shape[-1])),
            "b_dec": (self.b_dec, (self.W_dec.shape[-1],)),
        }
        if self.threshold is not None:
            expected["threshold"] = (self.threshold, (d_sae,))
        for name, (tensor, shape) in {**expected, "W_enc": (self.W_enc, (d_in, d_sae))}.items():
            if not tensor.is_floating_point():
                raise HookscopeError(
                    f"Dictionary {name} has dtype {tensor.dtype}; weights must be floating point "
                    "(inputs are cast to W_enc's dtype before encoding)."
                )
            if tuple(tensor.shape) != shape:
                raise HookscopeError(
                    f"Dictionary {name} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"(W_enc is [d_in={d_in}, d_sae={d_sae}])."
                )
        if self.subtract_decoder_bias and self.d_out != d_in:
            raise HookscopeError(
                f"subtract_decoder_bias needs d_out == d_in, got d_in={d_in}, d_out={self.d_out} "
                "(a transcoder usually has subtract_decoder_bias=False)."
            )

    def __repr__(self) -> str:
        where = self.reads if self.reads == self.writes else f"{self.reads} -> {self.writes}"
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"Dictionary({self.name!r}, {self.activation}{k}, {where}, d_in={self.d_in}, "
            f"d_sae={self.d_sae}, d_out={self.d_out})"
        )

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def is_transcoder(self) -> bool:
        return self.writes != self.reads

    def pre_activations(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., d_in]`` -> encoder pre-activations ``[..., d_sae]`` (in the weights' dtype),
        or only the features ``index [n]`` -> ``[..., n]``."""
        x = x.to(self.W_enc.dtype) * self.input_scale
        if self.subtract_decoder_bias:
            x = x - self.b_dec
        if index is None:
            return x @ self.W_enc + self.b_enc
        return x @ self.W_enc[:, index] + self.b_enc[index]

    @property
    def per_feature(self) -> bool:
        """Whether each feature's activation depends on its own pre-activation only (ReLU,
        JumpReLU, BatchTopK with an inference threshold), so a subset can be encoded alone."""
        return self.activation in ("relu", "jumprelu") or (
            self.activation == "batchtopk" and self.threshold is not None
        )

    def encode(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., d_in]`` -> feature activations ``[..., d_sae]``; with ``index [n]`` only
        those features ``[..., n]`` (computed alone when :attr:`per_feature`, else taken from
        the full encoding: TopK needs every pre-activation)."""
        if index is None:
            return self.activate(self.pre_activations(x))
        if not self.per_feature:
            return self.activate(self.pre_activations(x))[..., index]
        pre = self.pre_activations(x, index)
        if self.activation == "relu":
            return torch.relu(pre)
        return pre * (pre > self.threshold[index])

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Apply the activation rule to pre-activations ``[..., d_sae]`` (per vector)."""
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu" or (
            self.activation == "batchtopk" and self.threshold is not None
        ):
            return pre * (pre > self.threshold)
        return _topk_relu(pre, self.k)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """``features [..., d_sae]`` -> reconstruction ``[..., d_out]`` (input units)."""
        return (features.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``: ``[..., d_in]`` -> ``[..., d_out]``."""
        return self.decode(self.encode(x))

    def on(self, device: torch.device | str) -> Dictionary:
        """This dictionary with its tensors on ``device``: itself when they are there already,
        else a copy made once and kept (hooks call this per forward; a dictionary on the CPU
        used by a model on a GPU is copied to it once, not in every call)."""
        device = torch.device(device)
        if self.W_enc.device == device or (
            device.index is None and self.W_enc.device.type == device.type
        ):
            return self
        copies = self.__dict__.setdefault("_device_copies", {})
        state = self._state()
        if str(device) not in copies or copies[str(device)][0] != state:
            copies[str(device)] = (state, self.to(device))  # remade after any edit of self
        return copies[str(device)][1]

    def _state(self) -> tuple:
        """What a device copy depends on: each tensor's identity and in-place version, and the
        other fields (a copy made before ``d.W_dec[3] *= 2`` or ``d.k = 8`` is stale)."""
        tensors = (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold)
        versions = tuple(None if t is None else (id(t), _version(t)) for t in tensors)
        fields = (self.activation, self.k, self.input_scale, self.subtract_decoder_bias)
        return versions + fields

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Dictionary:
        """A copy with every tensor moved (floating tensors cast to ``dtype`` when given)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return Dictionary(
            W_enc=move(self.W_enc),
            b_enc=move(self.b_enc),
            W_dec=move(self.W_dec),
            b_dec=move(self.b_dec),
            activation=self.activation,
            reads=self.reads,
            writes=self.writes,
            k=self.k,
            threshold=move(self.threshold),
            input_scale=self.input_scale,
            subtract_decoder_bias=self.subtract_decoder_bias,
            name=self.name,
            metadata=dict(self.metadata),
        )


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter of ``tensor`` (None for an inference-mode tensor, which
    has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of each vector (ReLU'd), zero the rest. ``[..., d_sae]``."""
    k = min(k, pre.shape[-1])
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
