"""hookscope vs TransformerLens 4, nnsight 0.8 and the reference design (easyroutine 1.1.5).

    make bench-peers        # = python benchmarks/bench_peers.py --write (from hookscope's .venv)

Every peer runs in its own venv (created here by peer_envs.py: same torch pin, each tool's own
transformers pin) through peer_worker.py; hookscope runs in the calling interpreter.

1. Overhead: residual stream after every layer at the last token, batch 8 x 128, on
   SmolLM2-135M-Instruct and on a tiny random Llama. All tools' worker processes stay up and are
   timed in interleaved rounds (the order rotates each round); each worker also times the plain
   HF forward (SDPA) in the same round, and a tool's ratio is the median of its per-round
   ratios against that baseline, measured by the same interpreter and versions.
2. Dataset throughput (the setting of issue 19 by default): 256 prompts of 8-160 tokens
   (``common.varied_prompts``), last-token residual stream of every layer, batches of 32 sorted
   by length. Each tool in its own worker process, written the way its users would write it:
   hookscope's ``extract_cache``; ``nnsight-batched`` and ``transformer-lens-batched``, each
   peer's own batched way (one padded batch per call); the per-prompt loops (``nnsight``,
   ``transformer-lens``, ``easyroutine``, ``hookscope-batch1``); and ``plain-hf``, the HF
   decoder alone over the same batches (SDPA, no hooks, no unembedding): the eager limit.
   Every worker also times that plain decoder pass in the same round (same interpreter and
   versions); rounds are interleaved (the order rotates), and a tool's ratio is the median of
   its per-round ratios. Also: examples/s, tokens/s, peak memory above the loaded models, and
   the largest difference from hookscope's activations (every tool must compute the same
   thing; plain-hf's come from an extra, untimed hooked pass over the same batches).

On a GPU machine where the peers are installed into one interpreter, ``--shared-python`` runs
every worker with it instead of creating venvs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

import torch  # noqa: E402
from common import machine, smollm2_config, varied_prompts  # noqa: E402
from peer_envs import ensure  # noqa: E402

OVERHEAD_TOOLS = ("hookscope", "transformer-lens", "nnsight", "easyroutine")
DATASET_TOOLS = (
    "plain-hf",
    "hookscope",
    "nnsight-batched",
    "transformer-lens-batched",
    "hookscope-batch1",
    "nnsight",
    "transformer-lens",
    "easyroutine",
)
ONE_PROMPT_AT_A_TIME = ("hookscope-batch1", "nnsight", "transformer-lens", "easyroutine")
MAX_DIFFERENCE = 1e-4  # a row further from hookscope's activations computes something else


class Worker:
    """A peer_worker.py timing server in the tool's own interpreter."""

    def __init__(self, tool: str, folder: Path, mode: list[str], args, log: Path):
        self.tool = tool
        self.log = log
        self.process = subprocess.Popen(
            worker_command(tool, folder, args, *mode),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=worker_env(tool, args),
        )
        self.versions = self._reply()["versions"]

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        tail = self.log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{self.tool} worker stopped: {' | '.join(tail)}")

    def call(self, call: str, repeats: int = 1) -> dict:
        """``{"seconds", "peak_mb", "base_mb"}``: seconds per call over ``repeats``
        back-to-back calls, and the process's peak memory over them."""
        self.process.stdin.write(f"{call} {repeats}\n")
        self.process.stdin.flush()
        return self._reply()

    def time(self, call: str, repeats: int) -> float:
        """Seconds per call, over ``repeats`` back-to-back calls."""
        return self.call(call, repeats)["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def worker_env(tool: str, args) -> dict[str, str]:
    """The worker's environment: hookscope's source on the path, after any ``--site`` folder
    given for this tool (a GPU machine with one interpreter keeps a peer's pins there)."""
    paths = [site for name, site in args.site if name in (tool, venv_of(tool))]
    paths.append(str(ROOT / "src"))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def worker_command(tool: str, folder: Path, args, *mode: str) -> list[str]:
    """The command line of a peer_worker.py run for ``tool`` on ``folder``."""
    python = python_for(tool, args.shared_python)
    command = [python, str(HERE / "peer_worker.py"), tool, str(folder), *mode]
    return command + ["--device", args.device, "--dtype", args.dtype]


def venv_of(tool: str) -> str | None:
    """The peer venv whose library ``tool`` runs (``nnsight-batched``: nnsight's), or None for
    the calling interpreter's (hookscope's rows, plain-hf)."""
    if tool.startswith("hookscope") or tool == "plain-hf":
        return None
    return tool.removesuffix("-batched")


def python_for(tool: str, shared: bool) -> str:
    """hookscope runs in this interpreter; each peer in its own venv (or here with --shared-python)."""
    venv = venv_of(tool)
    if shared or venv is None:
        return sys.executable
    return str(ensure(venv))


def overhead(
    title: str, folder: Path, tokens: torch.Tensor, args, logs: Path, repeats: int, inner: int
) -> tuple[str, dict]:
    """``repeats`` interleaved rounds over every tool's worker, each timing the mean of
    ``inner`` back-to-back calls; returns a markdown table and the workers' versions."""
    saved = logs / f"tokens-{folder.name}.pt"
    torch.save(tokens, saved)
    workers, failed = {}, {}
    for tool in args.tools:
        try:
            mode = ["--tokens", str(saved)]
            workers[tool] = Worker(tool, folder, mode, args, logs / f"{tool}.log")
        except RuntimeError as error:
            failed[tool] = str(error)
    times = {tool: {"hf": [], "tool": []} for tool in workers}
    for round_index in range(args.warmup + repeats):
        names = list(workers)
        shift = round_index % len(names)
        for tool in names[shift:] + names[:shift]:
            pair = ("hf", "tool") if round_index % 2 == 0 else ("tool", "hf")
            measured = {call: workers[tool].time(call, inner) for call in pair}
            if round_index >= args.warmup:
                for call, seconds in measured.items():
                    times[tool][call].append(seconds)
    for worker in workers.values():
        worker.close()
    lines = [
        f"### {title}\n",
        "| tool | median ms | plain HF median ms (same process) | ratio vs plain HF (paired median) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for tool, measured in times.items():
        ratio = statistics.median(
            a / b for a, b in zip(measured["tool"], measured["hf"], strict=True)
        )
        lines.append(
            f"| {tool} | {statistics.median(measured['tool']) * 1e3:.1f} | "
            f"{statistics.median(measured['hf']) * 1e3:.1f} | {ratio:.3f} |"
        )
    for tool, error in failed.items():
        lines.append(f"| {tool} | failed: {error} | | |")
    return "\n".join(lines), {tool: worker.versions for tool, worker in workers.items()}


def length_sorted_batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices, ``batch_size`` at a time, by token count: the stable sort and the cut of
    hookscope's ``extract_cache(..., sort_by_length=True)``, so every tool runs its batches."""
    order = sorted(range(len(ids)), key=lambda index: len(ids[index]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def dataset(folder: Path, args, logs: Path, publish) -> None:
    """Every dataset tool's worker, timed in ``args.dataset_rounds`` interleaved rounds (each a
    full pass of the tool and of the plain decoder in the same process); activations compared
    with hookscope's. ``publish(table, versions)`` gets the table after every round."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = varied_prompts(tokenizer, args.prompts, args.min_tokens, args.max_tokens)
    ids = tokenizer(prompts)["input_ids"]
    batches = length_sorted_batches(ids, args.batch_size)
    data = logs / "dataset.json"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data.write_text(
        json.dumps({"prompts": prompts, "ids": ids, "batches": batches, "pad_id": pad_id})
    )
    workers, failed = {}, {}
    for tool in args.dataset_tools:
        mode = ["--dataset", str(data), "--out", str(logs / f"{tool}-acts.pt")]
        try:
            workers[tool] = Worker(tool, folder, mode, args, logs / f"{tool}-dataset.log")
        except RuntimeError as error:
            failed[tool] = str(error)
    versions = {tool: worker.versions for tool, worker in workers.items()}
    runs: dict[str, dict[str, list]] = {tool: {"hf": [], "tool": []} for tool in workers}
    for round_index in range(args.dataset_rounds):
        names = list(workers)
        shift = round_index % max(len(names), 1)
        for tool in names[shift:] + names[:shift]:
            pair = ("hf", "tool") if round_index % 2 == 0 else ("tool", "hf")
            try:
                for call in pair:
                    runs[tool][call].append(workers[tool].call(call))
            except RuntimeError as error:
                failed[tool] = str(error)
                del workers[tool], runs[tool]
        print(f"dataset round {round_index + 1}/{args.dataset_rounds} done", flush=True)
        publish(dataset_table(ids, batches, runs, {}, failed, args), versions)
    differences = compare_activations(workers, logs, failed)
    for worker in workers.values():
        worker.close()
    publish(dataset_table(ids, batches, runs, differences, failed, args), versions)


def compare_activations(workers: dict, logs: Path, failed: dict) -> dict[str, float]:
    """Each worker saves its last pass's activations; returns each tool's largest difference
    from hookscope's (or the first tool's), relative to their largest value."""
    found = {}
    for tool, worker in list(workers.items()):
        try:
            worker.call("save")
            found[tool] = torch.load(logs / f"{tool}-acts.pt")
        except RuntimeError as error:
            failed[tool] = str(error)
            del workers[tool]
    if not found:
        return {}
    reference = found.get("hookscope", next(iter(found.values())))
    scale = reference.abs().max().item()
    return {
        tool: (activations - reference).abs().max().item() / scale
        for tool, activations in found.items()
    }


def dataset_setting(args, ids: list[list[int]], batches: list[list[int]]) -> str:
    lengths = [len(row) for row in ids]
    return (
        f"{len(ids)} prompts of {min(lengths)}-{max(lengths)} tokens (mean "
        f"{sum(lengths) / len(lengths):.0f}, {sum(lengths)} in all), {len(batches)} batches of "
        f"{args.batch_size} sorted by length, {args.dtype} on {args.device}"
    )


def dataset_table(ids, batches, runs: dict, differences: dict, failed: dict, args) -> str:
    """The markdown dataset section from each tool's per-round ``hf`` / ``tool`` replies
    (``{"seconds", "peak_mb", "base_mb"}``) and activation differences."""
    setting = dataset_setting(args, ids, batches)
    tokens = sum(len(row) for row in ids)
    memory = "CUDA memory allocated" if args.device.startswith("cuda") else "resident set size"
    rounds = min((len(run["tool"]) for run in runs.values()), default=0)
    lines = [
        f"### Dataset throughput: {setting}, last-token resid_out of every layer\n",
        f'{rounds} interleaved round(s); one pass = the whole dataset. "vs plain HF" is the median '
        "over rounds of the tool's pass over the plain HF decoder's pass over the same batches "
        'in the same process (SDPA, no hooks, no unembedding: the eager limit); "vs plain-hf '
        'row" divides medians across processes. Batch: examples per forward. Peak memory is '
        f"the process's peak {memory} during a pass (models loaded before), growth that peak "
        "minus the level before the pass (largest over rounds). The last column is the largest "
        "difference from hookscope's activations (without a hookscope row: the first row's), "
        "relative to their largest value.\n",
        "| tool | batch | median s per pass | examples/s | tokens/s | vs plain HF (same process, "
        "paired median) | vs plain-hf row | peak MB | growth MB | max diff vs hookscope |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    limit = runs.get("plain-hf", {}).get("tool")
    limit_seconds = statistics.median(r["seconds"] for r in limit) if limit else None
    for tool, run in runs.items():
        if not run["tool"]:
            continue
        seconds = statistics.median(r["seconds"] for r in run["tool"])
        paired = statistics.median(
            a["seconds"] / b["seconds"] for a, b in zip(run["tool"], run["hf"], strict=False)
        )
        across = f"{seconds / limit_seconds:.3f}" if limit_seconds else "-"
        peak = max(r["peak_mb"] for r in run["tool"])
        growth = max(r["peak_mb"] - r["base_mb"] for r in run["tool"])
        difference = differences.get(tool)
        shown = "-" if difference is None else f"{difference:.1e}"
        if difference is not None and difference > MAX_DIFFERENCE:
            shown += " (WRONG: computes something else)"
        batch = 1 if tool in ONE_PROMPT_AT_A_TIME else args.batch_size
        lines.append(
            f"| {tool} | {batch} | {seconds:.2f} | {len(ids) / seconds:.1f} | "
            f"{tokens / seconds:.0f} | {paired:.3f} | {across} | {peak:.0f} | {growth:.0f} | "
            f"{shown} |"
        )
    for tool, error in failed.items():
        lines.append(f"| {tool} | failed: {error} | | | | | | | | |")
    return "\n".join(lines)


def versions_table(found: dict[str, dict], shared: bool) -> str:
    lines = [
        "| tool | version | python | torch | transformers | interpreter |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    shown = set()
    for tool, found_versions in found.items():
        package = venv_of(tool) or "hookscope"
        if package in shown or tool == "plain-hf" and "hookscope" in found:
            continue  # one row per library: its other rows run in the same interpreter
        shown.add(package)
        own = venv_of(tool) is None or shared
        where = "calling interpreter" if own else f".venv-peers/{package}"
        version = found_versions.get(package, found_versions.get("transformers"))
        lines.append(
            f"| {package if tool != 'plain-hf' else tool} | {version} | "
            f"{found_versions['python']} | {found_versions['torch']} | "
            f"{found_versions['transformers']} | {where} |"
        )
    return "\n".join(lines)


def tiny_model_folder(folder: Path) -> Path:
    from tiny_models import build_model, build_tokenizer

    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def random_smollm2_folder(folder: Path) -> Path:
    """SmolLM2-135M's architecture with random weights (where its weights cannot travel)."""
    from tiny_models import build_tokenizer
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM._from_config(smollm2_config()).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def site_pair(text: str) -> tuple[str, str]:
    tool, _, folder = text.partition("=")
    if not folder:
        raise argparse.ArgumentTypeError(f"--site wants TOOL=FOLDER, got {text!r}")
    return tool, folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--inner", type=int, default=1, help="calls per timing on SmolLM2 (the tiny model: 20)"
    )
    parser.add_argument("--prompts", type=int, default=256, help="prompts in the dataset section")
    parser.add_argument("--min-tokens", type=int, default=8, help="shortest dataset prompt")
    parser.add_argument("--max-tokens", type=int, default=160, help="longest dataset prompt")
    parser.add_argument("--batch-size", type=int, default=32, help="dataset batch size")
    parser.add_argument(
        "--dataset-rounds", type=int, default=3, help="interleaved dataset passes per tool"
    )
    parser.add_argument(
        "--skip-overhead", action="store_true", help="only the dataset section (no 8 x 128 rows)"
    )
    parser.add_argument("--tools", nargs="+", default=list(OVERHEAD_TOOLS))
    parser.add_argument("--dataset-tools", nargs="+", default=list(DATASET_TOOLS))
    parser.add_argument("--skip-tiny", action="store_true", help="only the SmolLM2 rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shared-python", action="store_true", help="no venvs: one interpreter")
    parser.add_argument(
        "--site",
        type=site_pair,
        action="append",
        default=[],
        help="TOOL=FOLDER: put FOLDER first on that tool's PYTHONPATH (with --shared-python)",
    )
    parser.add_argument("--model-dir", type=Path, help="default: the embedded SmolLM2-135M")
    parser.add_argument(
        "--random-weights", action="store_true", help="SmolLM2's architecture, random weights"
    )
    parser.add_argument("--logs", type=Path, help="keep the workers' logs in this folder")
    parser.add_argument("--write", type=Path, nargs="?", const=HERE / "RESULTS_peers.md")
    args = parser.parse_args()

    from hookscope.loading import default_model_dir

    command = " ".join(["python benchmarks/bench_peers.py", *sys.argv[1:]])
    sections = [f"Machine: {machine()}", f"Command: `{command}`"]
    found: dict[str, dict] = {}

    def add(section: str, replace: bool = False) -> None:
        """Print a finished section and rewrite the results file (a run cut short keeps it);
        ``replace`` updates the last section instead."""
        sections[-1 if replace else len(sections) :] = [section]
        print(section, flush=True)
        if args.write:
            text = "\n\n".join(
                [*sections[:2], versions_table(found, args.shared_python), *sections[2:]]
            )
            args.write.write_text(text + "\n")

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as temporary:
        logs = args.logs or Path(temporary)
        logs.mkdir(parents=True, exist_ok=True)
        if args.random_weights:
            smol, label = (
                random_smollm2_folder(logs / "smollm2-random"),
                "SmolLM2-135M architecture, random weights",
            )
        else:
            smol = args.model_dir or default_model_dir()
            label = "SmolLM2-135M-Instruct" if args.model_dir is None else smol.name
        if not args.skip_overhead:
            vocab = json.loads((smol / "config.json").read_text())["vocab_size"]
            tokens = torch.randint(10, vocab, (8, 128), generator=generator)
            title = f"{label}, batch 8 x 128, {args.dtype} on {args.device}"
            table, versions = overhead(title, smol, tokens, args, logs, args.repeats, args.inner)
            found.update(versions)
            add(table)
        if not (args.skip_tiny or args.skip_overhead):
            tiny = tiny_model_folder(logs / "tiny-llama")
            tokens = torch.randint(10, 320, (8, 128), generator=generator)
            # milliseconds per call: 20 calls in a row per timing, so that switching between
            # worker processes does not dominate, and twice the rounds
            title = "tiny random Llama (2 layers), batch 8 x 128"
            table, _ = overhead(title, tiny, tokens, args, logs, 2 * args.repeats, inner=20)
            add(table)
        add("### Dataset throughput: not run yet")

        def publish(table: str, versions: dict) -> None:
            found.update(versions)
            add(table, replace=True)

        dataset(smol, args, logs, publish)


if __name__ == "__main__":
    main()
