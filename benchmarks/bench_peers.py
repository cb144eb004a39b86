"""hookscope vs TransformerLens 4, nnsight 0.8 and the reference design (easyroutine 1.1.5).

    make bench-peers        # = python benchmarks/bench_peers.py --write (from hookscope's .venv)

Every peer runs in its own venv (created here by peer_envs.py: same torch pin, each tool's own
transformers pin) through peer_worker.py; hookscope runs in the calling interpreter.

1. Overhead: residual stream after every layer at the last token, batch 8 x 128, on
   SmolLM2-135M-Instruct and on a tiny random Llama. All tools' worker processes stay up and are
   timed in interleaved rounds (the order rotates each round); each worker also times the plain
   HF forward (SDPA) in the same round, and a tool's ratio is the median of its per-round
   ratios against that baseline, measured by the same interpreter and versions.
2. Dataset throughput: N prompts (default 1,000), last-token residual stream of every layer,
   each tool in a fresh process written the way its users would write it: hookscope's batched
   ``extract_cache`` vs per-prompt loops. Examples/s, peak memory above the loaded model, and
   the largest difference from hookscope's activations (every tool must compute the same thing).

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
from common import dataset_prompts, machine, smollm2_config  # noqa: E402
from peer_envs import ensure  # noqa: E402

OVERHEAD_TOOLS = ("hookscope", "transformer-lens", "nnsight", "easyroutine")
DATASET_TOOLS = ("hookscope", "hookscope-batch1", "easyroutine", "transformer-lens", "nnsight")


class Worker:
    """A peer_worker.py timing server in the tool's own interpreter."""

    def __init__(self, tool: str, folder: Path, tokens: Path, args, log: Path):
        self.tool = tool
        self.log = log
        self.process = subprocess.Popen(
            worker_command(tool, folder, args, "--tokens", str(tokens)),
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

    def time(self, call: str, repeats: int) -> float:
        """Seconds per call, over ``repeats`` back-to-back calls."""
        self.process.stdin.write(f"{call} {repeats}\n")
        self.process.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def worker_env(tool: str, args) -> dict[str, str]:
    """The worker's environment: hookscope's source on the path, after any ``--site`` folder
    given for this tool (a GPU machine with one interpreter keeps a peer's pins there)."""
    paths = [site for name, site in args.site if name == tool] + [str(ROOT / "src")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def worker_command(tool: str, folder: Path, args, *mode: str) -> list[str]:
    """The command line of a peer_worker.py run for ``tool`` on ``folder``."""
    python = python_for(tool, args.shared_python)
    command = [python, str(HERE / "peer_worker.py"), tool, str(folder), *mode]
    return command + ["--device", args.device, "--dtype", args.dtype]


def python_for(tool: str, shared: bool) -> str:
    """hookscope runs in this interpreter; each peer in its own venv (or here with --shared-python)."""
    if shared or tool.startswith("hookscope"):
        return sys.executable
    return str(ensure(tool))


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
            workers[tool] = Worker(tool, folder, saved, args, logs / f"{tool}.log")
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


def dataset(folder: Path, args, logs: Path, publish) -> None:
    """Each tool's dataset loop in a fresh process; activations compared with the first tool's.
    ``publish(table, versions)`` gets the table so far after every tool."""
    from transformers import AutoTokenizer

    prompts = dataset_prompts(args.prompts)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = logs / "dataset.json"
    data.write_text(json.dumps({"prompts": prompts, "ids": tokenizer(prompts)["input_ids"]}))
    memory = "CUDA memory allocated" if args.device.startswith("cuda") else "resident set size"
    header = [
        f"### Dataset throughput: {args.prompts} prompts, last-token resid_out of every layer\n",
        f"Peak memory is the process's peak {memory} during the loop (model loaded before); "
        "the growth column is that peak minus the level before the loop. The last column is the "
        "largest difference from the first row's activations, relative to their largest value.\n",
        "| tool | examples/s | peak MB | growth MB | max diff vs first row |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows, versions, reference = [], {}, None
    for tool in args.dataset_tools:
        out = logs / f"{tool}-acts.pt"
        log = logs / f"{tool}-dataset.log"
        done = subprocess.run(
            worker_command(tool, folder, args, "--dataset", str(data), "--out", str(out)),
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=worker_env(tool, args),
            check=False,
        )
        replies = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not replies:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            rows.append(f"| {tool} | failed: {tail} | | | |")
        else:
            report = json.loads(replies[-1])
            versions[tool] = report["versions"]
            activations = torch.load(out)
            reference = activations if reference is None else reference
            scale = reference.abs().max().item()
            difference = (activations - reference).abs().max().item() / scale
            rows.append(
                f"| {tool} | {args.prompts / report['seconds']:.1f} | {report['peak_mb']:.0f} | "
                f"{report['peak_mb'] - report['base_mb']:.0f} | {difference:.1e} |"
            )
        publish("\n".join(header + rows), versions)


def versions_table(found: dict[str, dict], shared: bool) -> str:
    lines = [
        "| tool | version | python | torch | transformers | interpreter |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for tool, found_versions in found.items():
        if tool == "hookscope-batch1":
            continue  # the same interpreter as hookscope
        package = "hookscope" if tool.startswith("hookscope") else tool
        own = tool.startswith("hookscope") or shared
        where = "calling interpreter" if own else f".venv-peers/{tool}"
        lines.append(
            f"| {tool} | {found_versions.get(package, '?')} | {found_versions['python']} | "
            f"{found_versions['torch']} | {found_versions['transformers']} | {where} |"
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
    parser.add_argument("--prompts", type=int, default=1000, help="prompts in the dataset row")
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
        vocab = json.loads((smol / "config.json").read_text())["vocab_size"]
        tokens = torch.randint(10, vocab, (8, 128), generator=generator)
        title = f"{label}, batch 8 x 128, {args.dtype} on {args.device}"
        table, versions = overhead(title, smol, tokens, args, logs, args.repeats, args.inner)
        found.update(versions)
        add(table)
        if not args.skip_tiny:
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
