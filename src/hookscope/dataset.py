"""Internal: extraction over a whole dataset (``HookedModel.extract_cache``).

Three concerns, kept apart: *batching* (:func:`iter_batches`: tokenized batches as given, or
lists of strings and records batched here), the *store* (a :class:`~hookscope.store.StoreWriter`
that checks each batch against what is already committed and writes the new ones), and
*progress* (:class:`Progress`). Every batch runs through ``HookedModel.forward``, so through the
one call pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .cache import ActivationCache
from .config import ExtractionConfig
from .dictionaries.features import plan_features
from .errors import HookscopeError, InputError
from .inputs import tokenize
from .progress import ProgressBar, real_tokens
from .reserve import ReservedResults, known_size
from .store import ActivationStore, StoreWriter, describe, slot_count_error
from .store_io import HostStager, store_dtype_of, to_store_dtype

Batch = tuple[Any, torch.Tensor | None, list[dict] | None]
_LAST_K = re.compile(r"^last-\d+$")
_RESERVE = True  # in-memory results into buffers reserved once (False: the plain merge; benchmarks)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def texts_of(dataloader: Any) -> list[str] | None:
    """The texts of a list of strings (itself) or of records ``[{"text": ..., ...}]``, else None.

    Raises:
        InputError: a list of records where one has no string ``"text"`` (named by its index).
    """
    if not isinstance(dataloader, list) or not dataloader:
        return None
    if isinstance(dataloader[0], str):
        for index, text in enumerate(dataloader):
            if not isinstance(text, str):
                raise InputError(
                    f"item {index} of a list of strings is a {type(text).__name__} ({text!r:.80}); "
                    "pass only strings, or only records {'text': ..., ...}."
                )
        return dataloader
    first = dataloader[0]
    if not (isinstance(first, dict) and isinstance(first.get("text"), str)) or "input_ids" in first:
        return None  # batches (a dataset's batch may carry its texts beside the input_ids)
    for index, record in enumerate(dataloader):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(
                f"record {index} has no string 'text' field ({record!r:.80}); every record of a "
                "list of records needs one."
            )
    return [record["text"] for record in dataloader]


def is_one_batch(inputs: Any) -> bool:
    """Whether ``inputs`` is one batch rather than a dataset of them: a tokenized batch (a
    mapping, an id tensor) or one prompt. Iterating it would give its key names, its rows or
    its characters."""
    return isinstance(inputs, Mapping | torch.Tensor | str)


def iter_batches(
    dataloader: Iterable[Any], tokenizer: Any, batch_size: int, sort_by_length: bool = False
) -> Iterator[Batch]:
    """``(batch, original indices or None, records or None)`` for each batch of ``dataloader``.

    One tokenized batch (a mapping, an id tensor) is one batch, never iterated (iterating a
    mapping would give its key names). Lists of strings and of records (dicts with a
    ``"text"``) are tokenised here, ``batch_size`` at a time, by length with ``sort_by_length``.
    """
    if isinstance(dataloader, str):  # one prompt: a list of one, batched like any list
        dataloader = [dataloader]
    if is_one_batch(dataloader):
        if sort_by_length:
            raise InputError("sort_by_length needs a list of strings, got one batch.")
        yield dataloader, None, None
        return
    texts = texts_of(dataloader)
    if sort_by_length and texts is None:
        raise InputError(
            "sort_by_length needs a list of strings or records (hookscope then builds the batches)."
        )
    if texts is None:
        for batch in dataloader:
            yield batch, None, None
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    order = list(range(len(texts)))
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        order.sort(key=lambda i: lengths[i])
    records = texts is not dataloader
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield (
            tokenize(tokenizer, [texts[i] for i in chosen]),
            torch.tensor(chosen) if sort_by_length else None,
            [dataloader[i] for i in chosen] if records else None,
        )


def _fixed_width(item: Any) -> bool:
    """Whether a position item selects exactly one token in every example (an int, "last",
    "first", "last-k"), so its slot count cannot change from batch to batch."""
    if isinstance(item, int) and not isinstance(item, bool):
        return True
    return isinstance(item, str) and (item in ("last", "first") or _LAST_K.match(item) is not None)


def _check_sortable(interventions: list) -> None:
    """``sort_by_length`` batches examples out of order, but a tensor with one row per example
    (a Patch source, a PatternEdit patch, a per-example Steer vector or Ablation mean) is read
    by each batch as a contiguous run of rows: refuse the combination rather than read others.

    Raises:
        InputError: naming the intervention.
    """
    for iv in interventions:
        if _reads_example_rows(iv):
            where = getattr(iv, "point", None) or f"layer {getattr(iv, 'layer', '?')}"
            raise InputError(
                f"sort_by_length=True reorders the examples, but {type(iv).__name__} on {where} "
                "reads one row per example in dataset order: pass sort_by_length=False."
            )


def _reads_example_rows(iv: Any) -> bool:
    names = ("source", "vector", "mean")
    operand = next((getattr(iv, n) for n in names if getattr(iv, n, None) is not None), None)
    if isinstance(operand, torch.Tensor):
        return operand.dim() == 3  # [examples, slots, width] / [examples, rows, columns]
    return hasattr(operand, "tensors") and not hasattr(iv, "mean")  # a mean cache is averaged


def describe_value(value: Any) -> Any:
    """A JSON description of an intervention or hook for a store's manifest: tensors (and
    caches) by a hash of their bytes, functions by their qualified name, dataclasses by field."""
    import dataclasses
    import hashlib

    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        return f"tensor{list(value.shape)}:{value.dtype}:{digest}"
    if isinstance(value, ActivationCache):
        return {key: describe_value(v) for key, v in sorted(value.tensors().items())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: describe_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__name__, **fields}
    if isinstance(value, Mapping):
        return {str(k): describe_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [describe_value(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return value if isinstance(value, str | int | float | bool | type(None)) else repr(value)


class Progress(ProgressBar):
    """The bar of ``extract_cache``: examples/s with tokens/s (see :mod:`hookscope.progress`)."""

    def __init__(self, dataloader: Any, done: int, enabled: bool):
        total = len(dataloader) if texts_of(dataloader) is not None else None
        super().__init__(total, "extract", enabled, unit="ex", initial=done)

    def update(self, batch: Any, rows: int) -> None:  # type: ignore[override]
        super().update(rows, real_tokens(batch))


class DatasetRun:
    """One ``extract_cache`` call: the fixed parts of every batch's forward, and what each
    batch keeps (``batch_saver`` fields, the example order)."""

    def __init__(
        self,
        hm: Any,
        positions: list,
        config: ExtractionConfig,
        batch_saver: Callable[[Any], dict[str, Any] | None] | None,
        sort_by_length: bool,
        forward_options: dict[str, Any],
        store_dtype: Any = None,
    ):
        self.hm, self.positions, self.config = hm, positions, config
        self.batch_saver, self.sort_by_length = batch_saver, sort_by_length
        self.store_dtype = store_dtype_of(store_dtype)  # fail before the loop
        # each batch's forward leaves its activations where they are; the loop moves them (into
        # pinned buffers, asynchronously, on the way to a store)
        self.to_host = bool(forward_options.pop("move_to_cpu", True))
        self.forward_options = {**forward_options, "move_to_cpu": False}
        if sort_by_length:
            interventions = [
                *hm.registered_interventions,
                *(forward_options.get("interventions") or []),
            ]
            _check_sortable(interventions)

    def extract(
        self, dataloader: Any, output_dir: Any, overwrite: bool, progress: bool
    ) -> ActivationCache | ActivationStore:
        """Every batch in order: merged in memory, or streamed to a store at ``output_dir``."""
        if output_dir is not None:
            self._check_slot_counts(dataloader, output_dir)  # before the folder is touched
            writer = self._writer(output_dir, overwrite)
            try:
                self._loop(dataloader, writer, progress)
                return writer.finish()  # marks the store complete and releases the folder
            except BaseException as error:
                # queued batches are committed, then the folder is released (a failed run must
                # not hold its lock); a failure of the writer thread is reported with ``error``
                writer.abort(error)
                raise
        size = known_size(dataloader, texts_of(dataloader))
        results = ReservedResults(size, self.hm.pad_token_id) if size and _RESERVE else None
        merged = self._loop(dataloader, None, progress, results)
        if results is not None:
            merged = results.result()
        if len(merged) == 0:
            raise InputError("extract_cache got an empty dataloader.")
        if self.sort_by_length and results is None:
            merged.reorder_rows(torch.argsort(merged["batch_saver"]["example_index"]))
        return merged

    def _check_slot_counts(self, dataloader: Any, output_dir: Any) -> None:
        """A store keeps one position slot count for every batch; where the positions' count
        may follow the prompt (``"all"``, slices, text anchors...) and the dataset is a list
        (strings, records or batches: it can be read twice), every batch is tokenised and its
        positions resolved first, so a mismatch is refused before anything is written. Other
        datasets are checked batch by batch as they are written (see
        :meth:`StoreWriter.write`).

        Raises:
            StoreError: naming the first two batches whose slot counts differ.
        """
        if self.config.extract_avg or all(_fixed_width(item) for item in self.positions):
            return
        if not isinstance(dataloader, list) or not dataloader:
            return
        first = None
        for index, slots in enumerate(self._slot_counts(dataloader)):
            if slots is None:
                return  # not resolvable here: the forward reports it, at that batch
            if first is None:
                first = slots
            elif slots != first:
                raise slot_count_error(
                    first,
                    slots,
                    f"the batches of this dataset (batch 0, batch {index})",
                    f"Nothing was written to {str(output_dir)!r}.",
                )

    def _slot_counts(self, dataloader: list) -> Iterator[int | None]:
        """Each batch's position slot count, resolved from its tokens alone (no forward); None
        for a batch whose positions do not resolve here."""
        tokenizer = self.hm.get_text_tokenizer()
        batches = iter_batches(
            dataloader, tokenizer, self.hm.config.batch_size, self.sort_by_length
        )
        pivots = self.forward_options.get("pivot_positions")
        seed = self.forward_options.get("seed", 0)
        for batch, _, _ in batches:
            try:
                inputs = self.hm.prepare_inputs(batch, device="cpu")
                context = self.hm.position_context(inputs, pivots, seed)
                yield context.resolve(self.positions).mask.shape[1]
            except HookscopeError:
                yield None

    def _writer(self, output_dir: Any, overwrite: bool) -> StoreWriter:
        options = {
            "batch_size": self.hm.config.batch_size,
            "sort_by_length": self.sort_by_length,
            "seed": self.forward_options.get("seed", 0),
            "pivot_positions": list(self.forward_options.get("pivot_positions") or []),
            # what changes the numbers besides the config: a resume without them would mix runs
            "interventions": [
                describe_value(i)
                for i in [
                    *self.hm.registered_interventions,
                    *(self.forward_options.get("interventions") or []),
                ]
            ],
            "hooks": [describe_value(h) for h in self.forward_options.get("hooks") or []],
            # the dtype of the stored activations (None: as computed): a resume keeps it
            "store_dtype": _dtype_name(self.store_dtype),
        }
        if self.forward_options.get("compile"):  # ~1e-6 from eager: a resume must not mix them
            options["compile"] = True
        features = plan_features(self.config, self.hm.dictionaries, self.hm.model_map)
        if features:  # their weights change the numbers too (by hash, as tensors above)
            options["dictionaries"] = {
                r.dictionary.name: describe_value(r.dictionary) for r in features
            }
        description = describe(self.hm, self.config, self.positions, options)
        return StoreWriter(output_dir, description, overwrite=overwrite, background=True)

    def _loop(
        self,
        dataloader: Any,
        writer: StoreWriter | None,
        progress: bool,
        results: ReservedResults | None = None,
    ) -> ActivationCache:
        merged = ActivationCache(pad_token_id=self.hm.pad_token_id)
        stager = HostStager()
        seen = writer.next_example if writer is not None else 0
        with Progress(dataloader, seen, progress) as bar:
            tokenizer = self.hm.get_text_tokenizer()
            batches = iter_batches(
                dataloader, tokenizer, self.hm.config.batch_size, self.sort_by_length
            )
            for index, (batch, order, records) in enumerate(batches):
                if writer is not None and writer.check_batch(index, batch, tokenizer, records):
                    continue  # committed by an earlier run, with the same examples
                # a short last batch reruns
                seen = writer.next_example if writer is not None else seen
                cache = self.hm.forward(
                    batch,
                    self.positions,
                    extraction_config=self.config,
                    example_offset=seen,
                    **self.forward_options,
                )
                rows = len(cache["position_mask"])
                saved = self._saved(
                    batch if records is None else records, order, seen, rows, writer
                )
                if saved is not None:
                    cache["batch_saver"] = saved
                to_store_dtype(cache, self.store_dtype)  # on the device: less to copy
                if writer is not None:
                    staged = stager.stage(cache) if self.to_host else None
                    writer.write(staged if staged is not None and staged.copying else cache)
                else:
                    cache = cache.cpu() if self.to_host else cache
                    if results is not None:
                        results.add(cache, order)
                    else:
                        merged.cat(cache)
                seen += rows
                bar.update(batch, rows)
        return merged

    def _saved(
        self, batch: Any, order: torch.Tensor | None, seen: int, rows: int, writer: Any
    ) -> dict[str, Any] | None:
        """The batch's ``batch_saver`` fields, plus ``example_index`` (each row's index in the
        dataset) when a store or ``sort_by_length`` needs the order back."""
        payload = self.batch_saver(batch) if self.batch_saver is not None else None
        if payload is not None and not isinstance(payload, dict):
            raise HookscopeError(
                f"batch_saver must return a dict (or None), got {type(payload).__name__}."
            )
        if payload is not None:  # the caller may reuse a tensor for the next batch: keep a copy
            payload = {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                for k, v in payload.items()
            }
        if writer is None and not self.sort_by_length:
            return payload
        index = order if order is not None else torch.arange(seen, seen + rows)
        return {**(payload or {}), "example_index": index}
