"""One tool's side of the peer benchmark, run in that tool's own venv (see peer_envs.py).

This file imports only torch, transformers and the one tool it runs, so it works in every peer
venv (and on a GPU machine with one shared interpreter). bench_peers.py drives it in two modes:

    python peer_worker.py TOOL MODEL_DIR --tokens batch.pt                 # overhead server
    python peer_worker.py TOOL MODEL_DIR --dataset data.json --out acts.pt  # dataset server

Both are timing servers on stdin/stdout: after loading they print one JSON line
``{"ready": ..., "versions": ...}``, then answer each stdin line ``hf N`` or ``tool N`` with
``{"seconds", "peak_mb", "base_mb"}`` (seconds: the mean of N back-to-back calls; memory: the
peak over those calls and the level before them), and stop on ``quit``. ``hf`` is the plain HF
call in this same process, so every tool's ratio is paired with a baseline measured by the same
interpreter and library versions.

Overhead server: both calls run on the [batch, seq] token tensor of ``--tokens``; ``hf`` is the
whole model's SDPA forward. Calls of a few milliseconds need N > 1, or the switch between worker
processes dominates.

Dataset server: ``data.json`` holds ``prompts``, their token ``ids``, ``batches`` (lists of
prompt indices: sorted by length, ``batch_size`` at a time) and the tokenizer's ``pad_id``.
``tool`` is one pass over the whole dataset the way a user of the tool writes it (batched where
the tool can batch), computing the last-token residual stream after every layer of every
prompt; ``save`` (whose time the driver ignores) writes the last pass's activations, float32
[prompts, layers, d_model] in prompt order, to ``--out`` so the driver can check that every tool
computed the same thing. ``hf`` is the eager limit: the plain HF decoder
(SDPA, no hooks, no hidden states, no unembedding) over the same batches, left-padded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# The protocol's JSON lines go to the real stdout; anything a tool prints (logs, progress bars)
# goes to stderr, so it cannot be mistaken for a reply.
PROTOCOL = sys.stdout
sys.stdout = sys.stderr


def reply(message: dict) -> None:
    PROTOCOL.write(json.dumps(message) + "\n")
    PROTOCOL.flush()


def load_kwargs(folder: Path, dtype: torch.dtype) -> dict:
    """``from_pretrained`` keywords that load ``folder`` the same way under transformers 4 and 5.

    Folders saved by transformers 5 keep RoPE's base in ``rope_parameters``, which transformers 4
    does not read: it would silently fall back to rope_theta 10000 (SmolLM2 uses 100000). Under
    transformers 4 the config is loaded here and given the old top-level key."""
    import transformers
    from transformers import AutoConfig

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"dtype": dtype}
    config = AutoConfig.from_pretrained(folder)
    rope = json.loads((folder / "config.json").read_text()).get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    return {"torch_dtype": dtype, "config": config}


def left_padded(rows: list[list[int]], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """One batch of token id lists, left-padded: ``input_ids``, ``attention_mask`` and the
    mask-derived ``position_ids`` (each row's real tokens at 0, 1, ...), all ``[rows, longest]``,
    so that position -1 is every row's last real token."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row)
        mask[index, width - len(row) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
    return {key: value.to(device) for key, value in inputs.items()}


def in_prompt_order(batches: list[list[int]], rows: list[torch.Tensor]) -> torch.Tensor:
    """``[prompts, layers, d]`` from each batch's ``[batch, layers, d]`` rows (batches are in
    length order; ``batches`` holds each one's prompt indices)."""
    order = torch.tensor([index for batch in batches for index in batch])
    stacked = torch.cat(rows)
    out = torch.empty_like(stacked)
    out[order] = stacked
    return out


class Tool:
    """The tool under test: ``extract(tokens)`` is the timed call, ``dataset(...)`` the loop."""

    name = ""
    package = ""

    def __init__(self, folder: Path, device: str, dtype: torch.dtype):
        self.folder, self.device, self.dtype = folder, device, dtype

    def hf_model(self, attn_implementation: str = "sdpa"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.folder,
            attn_implementation=attn_implementation,
            **load_kwargs(self.folder, self.dtype),
        )
        return model.to(self.device).eval()

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    def extract(self, tokens: torch.Tensor):
        raise NotImplementedError

    def dataset(
        self, prompts: list[str], ids: list[list[int]], batches: list[list[int]]
    ) -> torch.Tensor:
        """The per-prompt loop (``batches`` unused): ``extract`` on each prompt alone, its last
        token read by ``last_token``. Returns ``[prompts, layers, d]``."""
        rows = []
        for example in ids:
            result = self.extract(torch.tensor([example], device=self.device))
            rows.append(self.last_token(result))
        return torch.stack(rows)

    def last_token(self, result) -> torch.Tensor:
        """``[layers, d]`` at the last token, from what ``extract`` returned for one prompt."""
        raise NotImplementedError


class Hookscope(Tool):
    """Batched, padding-correct extraction (``extract_cache`` at the dataset's batch size)."""

    name = package = "hookscope"
    batch_size: int | None = None  # None: the dataset's batch size

    def __init__(self, folder, device, dtype):
        super().__init__(folder, device, dtype)
        from hookscope import ExtractionConfig, HookedModel

        self.hm = HookedModel.from_pretrained(str(folder), device_map=device, torch_dtype=dtype)
        self.config = ExtractionConfig(extract_resid_out=True)

    def extract(self, tokens):
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        return self.hm.forward(batch, ["last"], extraction_config=self.config)

    def dataset(self, prompts, ids, batches):
        """``extract_cache`` on the strings: it tokenizes, sorts by length and batches them
        itself, the same batches as ``batches`` (the same rule)."""
        from hookscope import ExtractionConfig

        self.hm.config.batch_size = self.batch_size or max(len(batch) for batch in batches)
        cache = self.hm.extract_cache(
            prompts,
            ["last"],
            extraction_config=ExtractionConfig(extract_resid_out=True, save_logits=False),
            sort_by_length=True,
        )
        return cache.stack("resid_out")[:, :, -1].transpose(0, 1)  # [prompts, layers, d]


class HookscopeBatch1(Hookscope):
    """hookscope's ``extract_cache`` at batch size 1: the same per-prompt loop as the peers."""

    name = "hookscope-batch1"
    batch_size = 1


class PlainHF(Tool):
    """The eager limit: the HF decoder alone (SDPA, no hooks, no hidden states, no unembedding)
    over the same left-padded batches; no activations come out of the timed pass."""

    name, package = "plain-hf", "transformers"

    pad_id = 0  # the dataset's pad id (serve_dataset sets it); masked, so any id computes alike

    def __init__(self, folder, device, dtype):
        super().__init__(folder, device, dtype)
        self.decoder = self.hf_model().model

    def dataset(self, prompts, ids, batches) -> None:
        """The timed pass: the decoder over each left-padded batch, its output dropped."""
        for batch in batches:
            inputs = left_padded([ids[i] for i in batch], self.pad_id, self.device)
            self.decoder(**inputs, use_cache=False)

    def reference(self, prompts, ids, batches):
        """The same batches with a forward hook on every decoder layer (untimed): checks that
        these batches, their padding and positions compute what hookscope computes."""
        rows, captured = [], []
        handles = [
            layer.register_forward_hook(
                lambda _m, _i, out: captured.append(
                    (out[0] if isinstance(out, tuple) else out)[:, -1]
                )
            )
            for layer in self.decoder.layers
        ]
        try:
            for batch in batches:
                captured.clear()
                self.decoder(
                    **left_padded([ids[i] for i in batch], self.pad_id, self.device),
                    use_cache=False,
                )
                rows.append(torch.stack(captured, 1))
        finally:
            for handle in handles:
                handle.remove()
        return in_prompt_order(batches, rows)


class TransformerLens(Tool):
    """TransformerLens 4's TransformerBridge (forces eager attention, mutates the model: own copy)."""

    name, package = "transformer-lens", "transformer-lens"

    def __init__(self, folder, device, dtype):
        super().__init__(folder, device, dtype)
        from transformer_lens.model_bridge import TransformerBridge

        self.bridge = TransformerBridge.boot_transformers(
            str(folder), hf_model=self.hf_model("eager"), tokenizer=self.tokenizer()
        )
        self.names = [
            f"blocks.{layer}.hook_resid_post" for layer in range(self.bridge.cfg.n_layers)
        ]

    def extract(self, tokens):
        names = set(self.names)
        return self.bridge.run_with_cache(tokens, names_filter=lambda name: name in names)

    def last_token(self, result):
        _, cache = result
        return torch.stack([cache[name][0, -1] for name in self.names])


class TransformerLensBatched(TransformerLens):
    """TransformerBridge on each batch's strings, left-padded by the bridge itself
    (``padding_side="left"``: it builds the attention mask and derives the position ids), no
    BOS prepended (SmolLM2 adds none; the other tools' ids have none), only the last position
    cached (``pos_slice=-1``). The bridge cannot stop after the last block (``stop_at_layer``
    stops before a block; the wrapped HF model always runs whole), so the unembedding runs."""

    name = "transformer-lens-batched"

    def dataset(self, prompts, ids, batches):
        names = set(self.names)
        rows = []
        for batch in batches:
            _, cache = self.bridge.run_with_cache(
                [prompts[i] for i in batch],
                names_filter=lambda name: name in names,
                padding_side="left",
                prepend_bos=False,
                pos_slice=-1,
            )
            rows.append(torch.stack([cache[name][:, -1] for name in self.names], 1))
        return in_prompt_order(batches, rows)


class Nnsight(Tool):
    """nnsight's ``LanguageModel`` with ``trace`` + ``.save()`` on every decoder layer."""

    name = package = "nnsight"

    def __init__(self, folder, device, dtype):
        super().__init__(folder, device, dtype)
        from nnsight import LanguageModel

        self.lm = LanguageModel(self.hf_model(), tokenizer=self.tokenizer())

    def extract(self, tokens):
        saved = []  # nnsight runs the block deferred: collect into an outer list
        with self.lm.trace(tokens):
            for layer in self.lm.model.layers:
                saved.append(layer.output[:, -1].save())
        return saved

    def last_token(self, result):
        return torch.stack([value[0] for value in result])


class NnsightBatched(Nnsight):
    """nnsight's batched way: one ``trace`` per batch of strings (nnsight left-pads a decoder's
    batch and derives its position ids, so ``output[:, -1]`` is each row's last real token),
    every layer's output saved, and ``tracer.stop()`` after the last layer (no final norm, no
    unembedding)."""

    name = "nnsight-batched"

    def dataset(self, prompts, ids, batches):
        if self.lm.tokenizer.padding_side != "left":
            raise RuntimeError("nnsight should left-pad a decoder's batch")
        rows = []
        for batch in batches:
            saved = []
            with self.lm.trace([prompts[i] for i in batch]) as tracer:
                for layer in self.lm.model.layers:
                    saved.append(layer.output[:, -1].save())
                tracer.stop()
            rows.append(torch.stack(saved, 1))
        return in_prompt_order(batches, rows)


class Easyroutine(Tool):
    """The reference design (PyPI easyroutine 1.1.5): ``HookedModel.extract_cache`` over a
    dataloader of one-prompt batches, its documented batch size (1), its default
    ``custom_eager`` attention modules.

    Its ``HookedModel`` only loads the checkpoint names in its own model table. The table's
    Llama entry, "hf-internal-testing/tiny-random-LlamaForCausalLM", takes the same module
    paths as SmolLM2 (a LlamaForCausalLM), so this shim loads the local folder under that name:
    the two ``from_pretrained`` calls of that entry read our folder, and the slow sentencepiece
    ``LlamaTokenizer`` it names (SmolLM2 ships a BPE ``tokenizer.json``) becomes a fast one.
    Nothing else of easyroutine is changed.
    """

    name = package = "easyroutine"
    ALIAS = "hf-internal-testing/tiny-random-LlamaForCausalLM"

    def __init__(self, folder, device, dtype):
        super().__init__(folder, device, dtype)
        import easyroutine.interpretability.models as table
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

        class LocalModel:
            @staticmethod
            def from_pretrained(_name, **kwargs):
                kwargs.update(load_kwargs(folder, kwargs.pop("torch_dtype")))
                return LlamaForCausalLM.from_pretrained(folder, **kwargs)

        class LocalTokenizer:
            @staticmethod
            def from_pretrained(_name, **_kwargs):
                config = json.loads((folder / "tokenizer_config.json").read_text())
                eos = config.get("eos_token") or "</s>"
                return PreTrainedTokenizerFast(
                    tokenizer_file=str(folder / "tokenizer.json"), eos_token=eos, pad_token=eos
                )

        table.LlamaForCausalLM, table.LlamaTokenizer = LocalModel, LocalTokenizer
        from easyroutine.interpretability.hooked_model import (
            ExtractionConfig,
            HookedModel,
            HookedModelConfig,
        )

        self.hm = HookedModel(
            HookedModelConfig(model_name=self.ALIAS, device_map=device, torch_dtype=dtype)
        )
        self.config = ExtractionConfig(extract_resid_out=True, save_logits=False)
        self.layers = self.hm.model_config.num_hidden_layers

    def extract(self, tokens):
        inputs = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        return self.hm.forward(
            inputs, target_token_positions=["last"], extraction_config=self.config
        )

    def dataset(self, prompts, ids, batches):
        loader = [
            {"input_ids": torch.tensor([example]), "attention_mask": torch.ones(1, len(example))}
            for example in ids
        ]
        cache = self.hm.extract_cache(loader, ["last"], extraction_config=self.config)
        return torch.stack([cache[f"resid_out_{layer}"][:, -1] for layer in range(self.layers)], 1)


TOOLS = {
    tool.name: tool
    for tool in (
        Hookscope,
        HookscopeBatch1,
        PlainHF,
        TransformerLens,
        TransformerLensBatched,
        Nnsight,
        NnsightBatched,
        Easyroutine,
    )
}


def versions(tool: type[Tool]) -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        found[tool.package] = version(tool.package)
    except PackageNotFoundError:  # on the path from a source tree, not installed
        module = __import__(tool.package.replace("-", "_"))
        found[tool.package] = getattr(module, "__version__", "source tree")
    return found


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    """Peak memory since the last reset: CUDA allocations on a GPU, resident set size (VmHWM)
    on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:  # "5" resets the peak resident set size (Linux, proc(5) clear_refs)
        Path("/proc/self/clear_refs").write_text("5")


def answer(calls: dict, device: str) -> None:
    """Answer ``NAME N`` lines on stdin (N back-to-back calls of ``calls[NAME]``) with their
    mean seconds and peak memory, until ``quit``."""
    for line in sys.stdin:
        request, _, count = line.strip().partition(" ")
        if request == "quit":
            return
        repeats = int(count or 1)
        reset_peak_memory(device)
        base = peak_memory_mb(device)
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            calls[request]()
        synchronize()
        seconds = (time.perf_counter() - start) / repeats
        reply({"seconds": seconds, "peak_mb": peak_memory_mb(device), "base_mb": base})


@torch.inference_mode()
def serve(tool: Tool, tokens: torch.Tensor) -> None:
    """The overhead server: the whole model's forward vs ``tool.extract`` on ``tokens``."""
    baseline = tool.hf_model()
    mask = torch.ones_like(tokens)
    calls = {
        "hf": lambda: baseline(input_ids=tokens, attention_mask=mask, use_cache=False),
        "tool": lambda: tool.extract(tokens),
    }
    reply({"ready": True, "versions": versions(type(tool))})
    answer(calls, tool.device)


@torch.inference_mode()
def serve_dataset(tool: Tool, data: dict, out: Path) -> None:
    """The dataset server: the plain decoder over the left-padded batches vs ``tool.dataset``;
    ``save`` writes the last ``tool`` pass's activations to ``out`` (plain-hf: those of an
    extra hooked pass over the same batches, see ``PlainHF.reference``)."""
    prompts, ids, batches = data["prompts"], data["ids"], data["batches"]
    decoder = tool.decoder if isinstance(tool, PlainHF) else tool.hf_model().model
    padded = [
        left_padded([ids[i] for i in batch], data["pad_id"], tool.device) for batch in batches
    ]
    if isinstance(tool, PlainHF):
        tool.pad_id = data["pad_id"]

    def plain() -> None:
        for inputs in padded:
            decoder(**inputs, use_cache=False)

    last: list[torch.Tensor] = []

    def tool_pass() -> None:
        last.clear()  # the previous pass's activations are not held during this one
        last.append(tool.dataset(prompts, ids, batches))

    def save() -> None:  # untimed by the driver
        if isinstance(tool, PlainHF):
            last[:] = [tool.reference(prompts, ids, batches)]
        torch.save(last[0].float().cpu(), out)

    warm = [list(range(min(4, len(ids))))]  # first-call allocations, outside every timing
    tool.dataset(prompts[:4], ids[:4], warm)
    decoder(**padded[0], use_cache=False)
    reply({"ready": True, "versions": versions(type(tool))})
    answer({"hf": plain, "tool": tool_pass, "save": save}, tool.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=sorted(TOOLS))
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--tokens", type=Path, help="timing server on this saved [B, T] tensor")
    parser.add_argument(
        "--dataset", type=Path, help="dataset server on this JSON {prompts, ids, batches}"
    )
    parser.add_argument("--out", type=Path, help="where the dataset server saves activations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    tool = TOOLS[args.tool](args.model_dir, args.device, getattr(torch, args.dtype))
    if args.tokens is not None:
        serve(tool, torch.load(args.tokens).to(args.device))
    else:
        serve_dataset(tool, json.loads(args.dataset.read_text()), args.out)


if __name__ == "__main__":
    main()
