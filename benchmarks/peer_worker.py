"""One tool's side of the peer benchmark, run in that tool's own venv (see peer_envs.py).

This file imports only torch, transformers and the one tool it runs, so it works in every peer
venv (and on a GPU machine with one shared interpreter). bench_peers.py drives it in two modes:

    python peer_worker.py TOOL MODEL_DIR --tokens batch.pt          # timing server (stdin/stdout)
    python peer_worker.py TOOL MODEL_DIR --dataset data.json --out acts.pt   # one dataset run

Timing server: prints one JSON line ``{"ready": ..., "versions": ...}``, then answers each stdin
line ``hf N`` or ``tool N`` with ``{"seconds": ...}``, the mean of N back-to-back calls on the
[batch, seq] token tensor, and stops on ``quit``. ``hf`` is the plain HF forward in this same
process, so every tool's ratio is paired with a baseline measured by the same interpreter and
library versions. N defaults to 1; calls of a few milliseconds need several, or the switch
between worker processes dominates.

Dataset run: last-token residual stream after every layer for every prompt, the way a user of
the tool would write the loop; prints ``{"seconds", "peak_mb", "base_mb"}`` and saves the
activations, float32 [prompts, layers, d_model], to ``--out`` so the driver can check that every
tool computed the same thing.
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

    def dataset(self, prompts: list[str], ids: list[list[int]]) -> torch.Tensor:
        """The per-prompt loop (no per-example positions under padding): ``extract`` on each
        prompt alone, its last token read by ``last_token``. Returns ``[prompts, layers, d]``."""
        rows = []
        for example in ids:
            result = self.extract(torch.tensor([example], device=self.device))
            rows.append(self.last_token(result))
        return torch.stack(rows)

    def last_token(self, result) -> torch.Tensor:
        """``[layers, d]`` at the last token, from what ``extract`` returned for one prompt."""
        raise NotImplementedError


class Hookscope(Tool):
    """Batched, padding-correct extraction (``extract_cache`` with a batch size of 32)."""

    name = package = "hookscope"

    def __init__(self, folder, device, dtype, batch_size: int = 32):
        super().__init__(folder, device, dtype)
        from hookscope import ExtractionConfig, HookedModel

        self.hm = HookedModel.from_pretrained(str(folder), device_map=device, torch_dtype=dtype)
        self.hm.config.batch_size = batch_size
        self.config = ExtractionConfig(extract_resid_out=True)

    def extract(self, tokens):
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        return self.hm.forward(batch, ["last"], extraction_config=self.config)

    def dataset(self, prompts, ids):
        from hookscope import ExtractionConfig

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

    def __init__(self, folder, device, dtype):
        super().__init__(folder, device, dtype, batch_size=1)


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

    def dataset(self, prompts, ids):
        loader = [
            {"input_ids": torch.tensor([example]), "attention_mask": torch.ones(1, len(example))}
            for example in ids
        ]
        cache = self.hm.extract_cache(loader, ["last"], extraction_config=self.config)
        return torch.stack([cache[f"resid_out_{layer}"][:, -1] for layer in range(self.layers)], 1)


TOOLS = {
    tool.name: tool for tool in (Hookscope, HookscopeBatch1, TransformerLens, Nnsight, Easyroutine)
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


@torch.inference_mode()
def serve(tool: Tool, tokens: torch.Tensor) -> None:
    """Answer timing requests on stdin until ``quit``."""
    baseline = tool.hf_model()
    mask = torch.ones_like(tokens)
    calls = {
        "hf": lambda: baseline(input_ids=tokens, attention_mask=mask, use_cache=False),
        "tool": lambda: tool.extract(tokens),
    }
    reply({"ready": True, "versions": versions(type(tool))})
    for line in sys.stdin:
        request, _, count = line.strip().partition(" ")
        if request == "quit":
            return
        repeats = int(count or 1)
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            calls[request]()
        synchronize()
        reply({"seconds": (time.perf_counter() - start) / repeats})


@torch.inference_mode()
def run_dataset(tool: Tool, data: dict, out: Path) -> None:
    """One timed pass over the dataset; peak memory is measured from after the model load."""
    tool.dataset(data["prompts"][:4], data["ids"][:4])  # warm-up (first-call allocations)
    reset_peak_memory(tool.device)
    base = peak_memory_mb(tool.device)
    synchronize()
    start = time.perf_counter()
    activations = tool.dataset(data["prompts"], data["ids"])
    synchronize()
    seconds = time.perf_counter() - start
    peak = peak_memory_mb(tool.device)
    torch.save(activations.float().cpu(), out)
    report = {
        "seconds": seconds,
        "peak_mb": peak,
        "base_mb": base,
        "versions": versions(type(tool)),
    }
    reply(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=sorted(TOOLS))
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--tokens", type=Path, help="timing server on this saved [B, T] tensor")
    parser.add_argument("--dataset", type=Path, help="JSON {prompts, ids}: one dataset run")
    parser.add_argument("--out", type=Path, help="where the dataset run saves activations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    tool = TOOLS[args.tool](args.model_dir, args.device, getattr(torch, args.dtype))
    if args.tokens is not None:
        serve(tool, torch.load(args.tokens).to(args.device))
    else:
        run_dataset(tool, json.loads(args.dataset.read_text()), args.out)


if __name__ == "__main__":
    main()
