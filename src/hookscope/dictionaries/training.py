"""Train a TopK / BatchTopK sparse autoencoder on stored activations (a small, honest trainer).

:func:`train_dictionary` streams shuffled batches of one point's real vectors from an
:class:`~hookscope.store.ActivationStore` (:class:`~hookscope.store_stream.ShuffledVectors`) or
from a tensor, and fits, with Adam::

    x' = x * input_scale                       (so that E||x'||^2 = d_in; undone on decode)
    pre = (x' - b_dec) @ W_enc + b_enc         [batch, d_sae]
    f = topk(pre) (per vector) or batchtopk(pre) (the k * batch largest of the whole batch), ReLU'd
    x_hat' = f @ W_dec + b_dec                 W_dec rows kept at unit norm
    loss = FVU(x', x_hat') + aux_coefficient * FVU(e, e_hat)

``FVU`` is the fraction of variance unexplained, ``||x - x_hat||^2 / ||x - mean(x)||^2`` over the
batch. The auxiliary term (AuxK, Gao et al. 2024) reconstructs the residual ``e = x' - x_hat'``
from the ``aux_k`` largest pre-activations of *dead* features only, which gives them gradient.
A feature is dead when it has not fired in the last ``dead_after`` training vectors.

Initialisation: ``b_dec`` = the mean of the first batch (in scaled units), ``W_dec`` random unit
rows, ``W_enc = W_dec.T``. After every step the decoder rows are renormalised (and the gradient
component along each row removed first, so Adam does not fight the constraint).

A BatchTopK dictionary gets, after training, one inference threshold (the mean over held-out
batches of the smallest activation that batch top-k keeps), so inference is per vector
(``pre > threshold``) and a batched forward equals one by one.

Reported (in ``dictionary.metadata["training"]``): per logged step the batch's FVU and L0, and at
the end on **held-out** vectors (the last ``holdout_shards`` shards of a store, or the last
``holdout_fraction`` of a tensor, never trained on), with the dictionary's own inference rule:
explained variance ``1 - sum||x - x_hat||^2 / sum||x - mean||^2``, mean L0, the fraction of
features dead at the end of training and the fraction that never fire on the held-out vectors.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import HookscopeError
from ..store import ActivationStore
from ..store_stream import ShuffledVectors, Slots, store_vectors
from .core import Dictionary

ACTIVATIONS = ("topk", "batchtopk")


@dataclass
class _Batches:
    """``epoch(e)`` -> shuffled batches of an in-memory ``[N, d]`` tensor (seeded per epoch)."""

    vectors: torch.Tensor
    batch_size: int
    seed: int

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.vectors), generator=generator)
        for start in range(0, len(order), self.batch_size):
            yield self.vectors[order[start : start + self.batch_size]]


def split_source(
    source: ActivationStore | str | torch.Tensor,
    point: str | None,
    batch_size: int,
    *,
    seed: int = 0,
    slots: Slots = None,
    holdout_shards: int = 1,
    holdout_fraction: float = 0.05,
    buffer_size: int = 65536,
    max_norm: float | None = None,
) -> tuple[Any, torch.Tensor]:
    """(training batches with ``epoch(e)``, held-out vectors ``[n_holdout, d]``) of ``source``.

    A store (or its folder) holds out its last ``holdout_shards`` shards; a tensor ``[N, d]``
    its last ``holdout_fraction`` rows (shuffle it first if its order means something).
    ``max_norm`` drops vectors whose norm exceeds it, from both.
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or not source.is_floating_point():
            raise HookscopeError(f"a tensor source must be float [N, d], got {list(source.shape)}.")
        if max_norm is not None:
            source = source[source.float().norm(dim=-1) <= max_norm]
        held = max(1, int(len(source) * holdout_fraction))
        if held >= len(source):
            raise HookscopeError(f"{len(source)} vectors leave none to train on.")
        return _Batches(source[:-held].float(), batch_size, seed), source[-held:].float()
    store = source if isinstance(source, ActivationStore) else ActivationStore.open(source)
    if not 1 <= holdout_shards < store.num_shards:
        raise HookscopeError(
            f"holdout_shards={holdout_shards}: the store has {store.num_shards} shards; hold out "
            "at least one and train on at least one (extract with a smaller batch_size)."
        )
    train = list(range(store.num_shards - holdout_shards))
    stream = ShuffledVectors(
        store, point, batch_size, buffer_size=buffer_size, seed=seed, slots=slots, shards=train,
        max_norm=max_norm, dtype=torch.float32,
    )  # fmt: skip
    held = store_vectors(store, point, slots, range(len(train), store.num_shards), max_norm)
    return stream, held.float()


class _SAE(torch.nn.Module):
    """The trained parameters, in scaled units (``x' = x * input_scale``)."""

    def __init__(self, d_in: int, d_sae: int, b_dec: torch.Tensor, generator: torch.Generator):
        super().__init__()
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(b_dec.clone())

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, d_in]`` -> ``[batch, d_sae]``."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient its component along the row."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad -= along * self.W_dec


def sparse_activate(pre: torch.Tensor, k: int, activation: str) -> torch.Tensor:
    """TopK per vector, or BatchTopK (the ``k * batch`` largest of the batch), ReLU'd.
    ``[batch, d_sae]`` -> ``[batch, d_sae]``."""
    if activation == "topk":
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    flat = pre.flatten()
    values, indices = flat.topk(min(k * len(pre), flat.numel()))
    return torch.zeros_like(flat).scatter(0, indices, torch.relu(values)).view_as(pre)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over a batch ``[batch, d]``: a scalar."""
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (x - x_hat).pow(2).sum() / total


def _aux_loss(
    sae: _SAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int
) -> torch.Tensor:
    """AuxK: FVU of the residual ``[batch, d]`` reconstructed from the ``aux_k`` largest
    pre-activations of the dead features (zero when none is dead)."""
    n_dead = int(dead.sum())
    if n_dead == 0 or aux_k == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))
    values, indices = masked.topk(min(aux_k, n_dead), dim=-1)
    f = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    return fvu(residual, f @ sae.W_dec)


@torch.no_grad()
def evaluate_dictionary(
    dictionary: Dictionary, vectors: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Explained variance ``1 - sum||x - x_hat||^2 / sum||x - mean||^2``, mean L0 and the
    fraction of features that never fire, over ``vectors [N, d_in]`` (the dictionary's own
    inference rule, in its input units).

    Raises:
        HookscopeError: no vectors (e.g. every held-out vector was left out by ``max_norm``).
    """
    if len(vectors) == 0:
        raise HookscopeError(
            "no vectors to evaluate the dictionary on: the held-out set is empty (were all its "
            "vectors left out by max_norm or slots?); keep more shards or loosen max_norm."
        )
    mean = vectors.double().mean(0)
    # sums kept on the dictionary's device, read once at the end (no sync per batch)
    device = dictionary.W_enc.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # error, total, active
    fired = torch.zeros(dictionary.d_sae, dtype=torch.bool, device=device)
    for start in range(0, len(vectors), batch_size):
        x = vectors[start : start + batch_size].to(device, dictionary.W_enc.dtype)
        f = dictionary.encode(x)
        sums[0] += (x - dictionary.decode(f)).double().pow(2).sum()
        sums[1] += (x.double() - mean.to(device)).pow(2).sum()
        sums[2] += (f > 0).sum()
        fired |= (f > 0).any(0)
    error, total, active = sums.tolist()
    return {
        "explained_variance": 1.0 - error / max(total, 1e-30),
        "l0": active / len(vectors),
        "never_fired_fraction": 1.0 - fired.float().mean().item(),
    }


@dataclass
class _Run:
    """The state of one training run (what the step loop reads and updates)."""

    sae: _SAE
    optimizer: torch.optim.Optimizer
    scale: float
    k: int
    activation: str
    aux_k: int
    aux_coefficient: float
    dead_after: int
    since_fired: torch.Tensor  # [d_sae] training vectors since each feature last fired
    steps: int = 0
    vectors: int = 0

    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One Adam step on ``x [batch, d_in]`` (input units); returns the batch's FVU and L0."""
        x = x * self.scale
        pre = self.sae.pre(x)
        f = sparse_activate(pre, self.k, self.activation)
        x_hat = f @ self.sae.W_dec + self.sae.b_dec
        main = fvu(x, x_hat)
        dead = self.since_fired >= self.dead_after
        aux = _aux_loss(self.sae, pre, (x - x_hat).detach(), dead, self.aux_k)
        self.optimizer.zero_grad(set_to_none=True)
        (main + self.aux_coefficient * aux).backward()
        self.sae.project_decoder_grad()
        self.optimizer.step()
        self.sae.normalise_decoder()
        fired = (f > 0).any(0)
        self.since_fired += len(x)
        self.since_fired[fired] = 0
        self.steps, self.vectors = self.steps + 1, self.vectors + len(x)
        # tensors: read (one sync) only for the steps that are logged (see _logged)
        return {
            "step": self.steps,
            "vectors": self.vectors,
            "fvu": main.detach(),
            "aux_fvu": aux.detach(),
            "l0": (f > 0).sum() / len(x),
            "dead_fraction": dead.float().mean(),
        }


def _check_arguments(d_sae: int, k: int, activation: str, epochs: int, batch_size: int) -> None:
    if activation not in ACTIVATIONS:
        raise HookscopeError(f"activation {activation!r} is not one of {ACTIVATIONS}.")
    for name, value in (("d_sae", d_sae), ("k", k), ("epochs", epochs), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value > 0):
            raise HookscopeError(f"{name} must be a positive int, got {value!r}.")
    if k > d_sae:
        raise HookscopeError(f"k={k} is larger than d_sae={d_sae}.")


def train_dictionary(
    source: ActivationStore | str | torch.Tensor,
    point: str | None,
    d_sae: int,
    k: int,
    *,
    activation: str = "topk",
    epochs: int = 1,
    batch_size: int = 1024,
    lr: float | None = None,
    seed: int = 0,
    slots: Slots = None,
    holdout_shards: int = 1,
    holdout_fraction: float = 0.05,
    buffer_size: int = 65536,
    max_norm: float | None = None,
    aux_k: int | None = None,
    aux_coefficient: float = 1 / 32,
    dead_after: int = 100_000,
    max_steps: int | None = None,
    log_every: int = 50,
    log: Callable[[dict[str, float]], Any] | None = None,
    name: str = "sae",
    device: Any = "cpu",
) -> Dictionary:
    """Train a TopK / BatchTopK SAE on ``point``'s vectors and return it as a :class:`Dictionary`.

    Args:
        source: an :class:`ActivationStore`, its folder, or a float tensor ``[N, d_in]``.
        point: the stored point (``"resid_out_15"``); it becomes the dictionary's ``reads``
            (for a tensor source, pass the point the vectors come from, or ``None``: "unknown").
        d_sae: number of features; k: features per vector (on average, for batchtopk).
        activation: ``"topk"`` or ``"batchtopk"``.
        epochs, batch_size, seed: passes over the training vectors, vectors per Adam step, seed of
            the initialisation and the shuffle. ``max_steps`` stops earlier.
        lr: Adam's learning rate; default ``2e-4 / sqrt(d_sae / 16384)`` (sparsify's rule).
        slots: only these position slots of the store (``slice(1, None)`` drops the first token).
        max_norm: leave out vectors whose norm exceeds it (training and evaluation): the few
            "massive activations" of attention-sink tokens, ~100x the median norm, would
            otherwise dominate the variance (and the explained variance).
        holdout_shards / holdout_fraction: held out for the final evaluation (see
            :func:`split_source`).
        aux_k, aux_coefficient: AuxK's features (default ``d_in // 2``; 0 turns it off) and weight.
        dead_after: a feature is dead when it has not fired in this many training vectors.
        log: called with each logged step's numbers (every ``log_every`` steps, and the last).
        name, device: the dictionary's name; where training runs (the result is on the CPU).

    Returns:
        A :class:`Dictionary` (``reads = writes = point``, ``subtract_decoder_bias=True``) whose
        ``metadata["training"]`` holds the held-out evaluation, the history and the settings.
    """
    _check_arguments(d_sae, k, activation, epochs, batch_size)
    started = time.perf_counter()
    batches, held_out = split_source(
        source, point, batch_size, seed=seed, slots=slots, holdout_shards=holdout_shards,
        holdout_fraction=holdout_fraction, buffer_size=buffer_size, max_norm=max_norm,
    )  # fmt: skip
    start = functools.partial(
        _start, d_sae=d_sae, k=k, activation=activation, lr=lr, aux_k=aux_k,
        aux_coefficient=aux_coefficient, dead_after=dead_after, seed=seed,
    )  # fmt: skip
    run, history = _fit(batches, start, epochs, max_steps, log_every, log, device)
    dictionary = _to_dictionary(run, point, name, held_out)
    report = evaluate_dictionary(dictionary, held_out)
    report |= {
        "dead_fraction": (run.since_fired >= run.dead_after).float().mean().item(),
        "dead_features": torch.nonzero(run.since_fired >= run.dead_after).flatten().tolist(),
        "steps": run.steps,
        "training_vectors": run.vectors,
        "holdout_vectors": len(held_out),
        "seconds": time.perf_counter() - started,
    }
    settings = {"d_sae": d_sae, "k": k, "activation": activation, "epochs": epochs,
                "batch_size": batch_size, "lr": run.optimizer.param_groups[0]["lr"], "seed": seed,
                "aux_k": run.aux_k, "aux_coefficient": aux_coefficient, "dead_after": dead_after,
                "max_norm": max_norm}  # fmt: skip
    dictionary.metadata["training"] = {**report, "settings": settings, "history": history}
    return dictionary


def _fit(
    batches: Any,
    start: Callable[[torch.Tensor], _Run],
    epochs: int,
    max_steps: int | None,
    log_every: int,
    log: Callable[[dict[str, float]], Any] | None,
    device: Any,
) -> tuple[_Run, list[dict[str, float]]]:
    """The step loop: ``start(first batch)`` builds the run, then one Adam step per batch for
    ``epochs`` epochs (or ``max_steps``). Returns the run and the logged steps (the last
    step always among them)."""
    run, history, numbers = None, [], {}
    for epoch in range(epochs):
        for x in batches.epoch(epoch):
            x = x.to(device)
            run = start(x) if run is None else run
            numbers = run.step(x)
            if run.steps % log_every == 0:
                numbers = _logged(numbers)
                history.append(numbers)
                if log is not None:
                    log(numbers)
            if max_steps is not None and run.steps >= max_steps:
                break
        if max_steps is not None and run is not None and run.steps >= max_steps:
            break
    if run is None:
        raise HookscopeError("the source holds no training vectors.")
    if not history or history[-1]["step"] != run.steps:
        history.append(_logged(numbers))
    return run, history


def _logged(numbers: dict) -> dict:
    """A step's numbers as Python floats: its tensors read in one device sync."""
    names = [k for k, v in numbers.items() if isinstance(v, torch.Tensor)]
    if not names:
        return numbers
    values = torch.stack([numbers[k].float() for k in names]).tolist()
    return {**numbers, **dict(zip(names, values, strict=True))}


def _start(
    first: torch.Tensor,
    *,
    d_sae: int,
    k: int,
    activation: str,
    lr: float | None,
    aux_k: int | None,
    aux_coefficient: float,
    dead_after: int,
    seed: int,
) -> _Run:
    """Initialise from the first batch ``[batch, d_in]``: the input scale (``E||x'||^2 = d_in``)
    and ``b_dec`` (the batch mean, scaled)."""
    d_in = first.shape[1]
    scale = math.sqrt(d_in) / first.norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-12).item()
    generator = torch.Generator().manual_seed(seed)
    sae = _SAE(d_in, d_sae, (first * scale).mean(0).cpu(), generator).to(first.device)
    lr = 2e-4 / math.sqrt(d_sae / 2**14) if lr is None else lr
    return _Run(
        sae=sae,
        optimizer=torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999)),
        scale=scale,
        k=k,
        activation=activation,
        aux_k=d_in // 2 if aux_k is None else aux_k,
        aux_coefficient=aux_coefficient,
        dead_after=dead_after,
        since_fired=torch.zeros(d_sae, dtype=torch.long, device=first.device),
    )


@torch.no_grad()
def batchtopk_threshold(
    sae: _SAE, vectors: torch.Tensor, k: int, batch_size: int, scale: float
) -> float:
    """The mean over batches of ``vectors [N, d_in]`` of the smallest positive activation that
    batch top-k keeps: BatchTopK's per-vector inference threshold."""
    minima = []
    for start in range(0, len(vectors) - batch_size + 1, batch_size):
        f = sparse_activate(sae.pre(vectors[start : start + batch_size] * scale), k, "batchtopk")
        kept = f[f > 0]
        if kept.numel():
            minima.append(kept.min().item())
    if not minima:
        raise HookscopeError(f"no held-out batch of {batch_size} vectors to set the threshold.")
    return sum(minima) / len(minima)


def _to_dictionary(run: _Run, point: str | None, name: str, held_out: torch.Tensor) -> Dictionary:
    """The trained weights as a :class:`Dictionary` on the CPU (input units through
    ``input_scale``); a BatchTopK one gets its inference threshold from ``held_out``."""
    sae = run.sae.cpu()
    threshold = None
    if run.activation == "batchtopk":
        batch = min(len(held_out), 1024)
        value = batchtopk_threshold(sae, held_out, run.k, batch, run.scale)
        threshold = torch.full((sae.W_enc.shape[1],), value)
    detach = lambda t: t.detach().clone()  # noqa: E731
    return Dictionary(
        W_enc=detach(sae.W_enc), b_enc=detach(sae.b_enc), W_dec=detach(sae.W_dec),
        b_dec=detach(sae.b_dec), activation=run.activation, reads=point or "unknown", k=run.k,
        threshold=threshold, input_scale=run.scale, subtract_decoder_bias=True, name=name,
    )  # fmt: skip
