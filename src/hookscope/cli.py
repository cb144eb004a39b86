"""The ``hookscope`` command (also ``python -m hookscope``).

    hookscope demo [--out DIR]
    hookscope info [MODEL]
    hookscope check [MODEL] [--no-remember]
    hookscope extract [MODEL] --prompts FILE --positions last --points resid_out --out DIR
                      [--overwrite]   (a resumable store; Ctrl-C, then the same command resumes)
    hookscope patch [MODEL] --clean TEXT --corrupt TEXT --correct TOKEN --wrong TOKEN --out DIR
    hookscope lens [MODEL] --prompt TEXT [--target TOKEN] --out DIR
    hookscope report RESULT.json [RESULT.json ...] --out PAGE.html

User mistakes print one line and a hint, and exit with status 2 (no stack trace); Ctrl-C prints
one line and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from .errors import HookscopeError

_HINTS = {
    "could not load": "pass a model folder, a .gguf file, or nothing for the embedded default model",
    "position item": "positions look like: last first 0 -2 2:5 all (see README, Token positions)",
    "unknown activation point": "see `hookscope info` for the activation points of a model",
}


PROMPTS_FILE = "prompts.json"  # beside the store: the prompts it holds, in row order


class CliError(HookscopeError):
    """A command-line mistake (bad file, bad option value)."""


class Interrupted(Exception):
    """Ctrl-C during a command; ``main`` prints this one line and exits with status 130."""


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(model: str | None):
    from .hooked_model import HookedModel

    return HookedModel.from_pretrained(model)


def _positions(values: list[str]) -> list:
    """CLI position items: ints, ``a:b`` slices, and names."""
    items = []
    for value in values:
        if value.startswith("{") or re.match(r"^[a-z][\w-]*:", value):
            items.append(value)  # a text anchor's JSON, a role item ("user:last"), "first-image:0"
        elif ":" in value:
            start, end = value.split(":", 1)
            try:
                items.append((int(start), int(end)))
            except ValueError:
                raise CliError(f"slice {value!r} must be two ints, like 2:5") from None
        else:
            try:
                items.append(int(value))
            except ValueError:
                items.append(value)
    return items


def _read_prompts(path: str) -> list[str]:
    """The prompts of a ``.txt`` file (one a line) or ``.jsonl`` file (``{"text": ...}`` a line).

    Row i of the output is line i + 1 of the file: a blank line inside the file is refused with
    its line number (skipping it would shift every later row); blank lines at the end are fine.
    """
    file = Path(path)
    if not file.is_file():
        raise CliError(f"prompts file {path!r} does not exist")
    lines = file.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise CliError(f"prompts file {path!r} has no prompts")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise CliError(
                f"{path}:{number} is blank; each line is one prompt and row i of the output is "
                "line i + 1, so remove blank lines (or put text on them)"
            )
    if file.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CliError(f"{path}:{number} is not JSON ({error.msg})") from None
        text = record.get("text", record.get("prompt")) if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise CliError(f"{path}:{number} has no 'text' (or 'prompt') string")
        prompts.append(text)
    return prompts


def _verb(sub, name: str, summary: str, description: str, examples: str):
    """A subcommand parser with a one-line ``summary`` (in ``hookscope --help``), a
    ``description`` and an ``Examples:`` epilog (in ``hookscope NAME --help``)."""
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog="Examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _comma_separated(values: list[str]) -> list[str]:
    """``["resid_out,mlp_out", "attn_in"]`` -> ``["resid_out", "mlp_out", "attn_in"]``."""
    return [item for value in values for item in value.split(",") if item]


def _extraction_options(parser: argparse.ArgumentParser) -> None:
    """Every boolean ExtractionConfig field as a --flag."""
    from .config import ExtractionConfig

    group = parser.add_argument_group("ExtractionConfig flags")
    for field in fields(ExtractionConfig):
        if field.type in ("bool", bool):
            flag = "--" + field.name.replace("_", "-")
            if field.default is True:
                group.add_argument(
                    "--no-" + field.name.replace("_", "-"),
                    dest=field.name,
                    action="store_false",
                    help=f"turn off {field.name}",
                )
            else:
                group.add_argument(
                    flag, dest=field.name, action="store_true", help=f"set {field.name}"
                )


def _extraction_config_of(args: argparse.Namespace):
    """The ExtractionConfig of ``hookscope extract``'s flags, ``--points`` and ``--layers``."""
    from .config import FLAG_OF_KIND, LAYER_FLAGS, MODEL_FLAGS, ExtractionConfig

    values = {
        f.name: getattr(args, f.name) for f in fields(ExtractionConfig) if hasattr(args, f.name)
    }
    by_kind = {kind: FLAG_OF_KIND[kind] for kind in [*LAYER_FLAGS.values(), *MODEL_FLAGS.values()]}
    for point in _comma_separated(args.points):
        if point not in by_kind:
            raise CliError(
                f"--points {point!r} is not a point kind; valid: {', '.join(sorted(by_kind))}"
            )
        values[by_kind[point]] = True
    if args.layers:
        values["layers"] = args.layers
    return ExtractionConfig(**values)


def _prepare_output(out: Path, prompts: list[str], overwrite: bool) -> None:
    """Make ``out`` ready for a store of ``prompts``: a new or empty folder; a store of the same
    prompts (a partial one resumes, a complete one is kept); or, with ``overwrite``, a hookscope
    store deleted first. Anything else is refused (hookscope deletes only its own stores)."""
    from .store import MANIFEST

    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} is a file; give a folder")
    contents = {path.name for path in out.iterdir()} if out.is_dir() else set()
    # a store, a Ray run's part stores, or only the prompts of a run stopped before its first write
    is_store = (out / MANIFEST).is_file() or any(out.glob(f"part-*/{MANIFEST}"))
    if not is_store and not contents <= {PROMPTS_FILE}:
        raise CliError(
            f"--out {str(out)!r} exists and is not a hookscope store (no {MANIFEST}); "
            "choose another folder (hookscope deletes only its own stores)"
        )
    if is_store and overwrite:
        _remove_store(out)
    elif is_store:
        saved = out / PROMPTS_FILE
        if not saved.is_file() or json.loads(saved.read_text(encoding="utf-8")) != prompts:
            raise CliError(
                f"--out {str(out)!r} holds a store of other prompts; pass --overwrite to "
                "replace it, or choose another folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PROMPTS_FILE}.tmp"
    tmp.write_text(json.dumps(prompts, indent=1), encoding="utf-8")
    os.replace(tmp, out / PROMPTS_FILE)


def _remove_store(folder: Path) -> None:
    """Delete the hookscope store in ``folder`` (manifest, shards, statistics, lock, prompts, a
    Ray run's part stores) and nothing else: files of the user's beside it stay."""
    from .store import _OWN_FILES, LOCK, MANIFEST

    for part in folder.glob(f"part-*/{MANIFEST}"):
        _remove_store(part.parent)
    for pattern in (MANIFEST, LOCK, PROMPTS_FILE, ".*.tmp", *_OWN_FILES):
        for path in folder.glob(pattern):
            path.unlink()
    if folder.name.startswith("part-") and not any(folder.iterdir()):
        folder.rmdir()


def _committed_examples(out: Path) -> int:
    """Examples committed in the store at ``out`` (or in a Ray run's part stores; 0 if none)."""
    from .store import MANIFEST

    manifests = [out / MANIFEST] if (out / MANIFEST).is_file() else out.glob(f"part-*/{MANIFEST}")
    total = 0
    for path in manifests:
        try:
            total += int(json.loads(path.read_text())["examples"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a manifest being replaced: count what can be read
    return total


def _run_extraction(args: argparse.Namespace, prompts: list[str], config, out: Path):
    """Extract ``prompts`` into the store at ``out`` (in this process, or on Ray)."""
    positions = _positions(args.positions)
    if args.ray:
        import functools

        from .distributed import extract_distributed
        from .hooked_model import HookedModel

        return extract_distributed(
            functools.partial(HookedModel.from_pretrained, args.model),
            prompts,
            positions,
            config,
            str(out),
            num_workers=args.workers,
            batch_size=args.batch_size,
            address=None if args.ray == "local" else args.ray,
        )
    hm = _load(args.model)
    hm.config.batch_size = args.batch_size
    return hm.extract_cache(
        prompts, positions, extraction_config=config, progress=True, output_dir=str(out)
    )


def _cmd_extract(args: argparse.Namespace) -> None:
    """Stream the activations of every prompt into a resumable store (``hookscope.store``)."""
    from .positions import normalize_items

    prompts = _read_prompts(args.prompts)
    config = _extraction_config_of(args)
    if args.logits_only and not config.save_logits:
        raise CliError(
            "--logits-only and --no-save-logits together leave nothing to extract; drop one"
        )
    if not config.is_not_empty() and not args.logits_only:
        raise CliError(
            "extract has nothing to extract: name points with --points (e.g. "
            "--points resid_out,mlp_out) or an --extract-* flag, or pass --logits-only "
            "to save only the logits"
        )
    normalize_items(_positions(args.positions))  # every mistake is reported before any write
    out = Path(args.out)
    _prepare_output(out, prompts, args.overwrite)
    try:
        store = _run_extraction(args, prompts, config, out)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; {_committed_examples(out)} of {len(prompts)} prompts are saved in "
            f"{out}/: run the same command again to resume"
        ) from None
    shards = store.manifest["shards"]
    size = sum(shard["bytes"] for shard in shards) / 2**20
    workers = f", {args.workers} workers" if args.ray else ""
    keys = [key for key in store.keys() if not key.startswith("batch_saver/")]
    print(
        f"{len(store)} prompts -> {out}/ ({len(shards)} shard{'s' * (len(shards) != 1)}{workers}, "
        f"{len(keys)} keys, {size:.1f} MB)"
    )


def _token_id(hm, text: str) -> int:
    ids = hm.get_text_tokenizer()(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise CliError(
            f"{text!r} is {len(ids)} tokens; answers must be single tokens (mind the leading space)"
        )
    return ids[0]


def _patching_figures(result, model_name: str, point: str, out: Path) -> None:
    """The PNG and HTML heatmaps of a patching result (a 1-D grid is drawn as one row)."""
    from . import plot

    values, axes = result.values, list(result.axes)
    if values.dim() == 1:
        values, axes = values.unsqueeze(0), ["", *axes]
    rows = result.labels.get(axes[0], [""])
    columns = result.labels[axes[1]]
    metric = f"{result.metric}{' (normalised: clean=1, corrupt=0)' if result.normalized else ''}"
    title = f"{model_name}: {result.method} patching of {point}, {metric}"
    plot.heatmap_figure(
        values, rows, columns, title, axes[1], axes[0], metric,
        path=out / f"patching_{point}.png", diverging=True,
    )  # fmt: skip
    result.save(out / f"patching_{point}.json")
    _write_report(f"hookscope patch: {model_name}", [result], out / f"patching_{point}.html")


def _write_report(title: str, results: list, path: Path) -> Path:
    """One report page of ``results`` (see ``hookscope.report``)."""
    from .report import Report

    report = Report(title)
    for result in results:
        report.add(result)
    return report.write(path)


def _cmd_patch(args: argparse.Namespace) -> None:
    from .patching import activation_patching

    hm = _load(args.model)
    tokenizer = hm.get_text_tokenizer()
    clean, corrupt = (tokenizer([t], return_tensors="pt") for t in (args.clean, args.corrupt))
    answers = ([_token_id(hm, args.correct)], [_token_id(hm, args.wrong)])
    result = activation_patching(
        hm, clean, corrupt, answers, point=args.point, per=args.per, progress=True
    )
    result.context = {
        "model": str(hm.model_name), "point": args.point, "clean": args.clean,
        "corrupt": args.corrupt, "correct": args.correct, "wrong": args.wrong,
    }  # fmt: skip
    out = Path(args.out)
    _patching_figures(result, str(hm.model_name), args.point, out)
    print(
        f"{result}\nclean {result.clean_metric[0]:.3f}, corrupt {result.corrupt_metric[0]:.3f}; "
        f"figures, result (.json) and report (.html) in {out}/"
    )


def _cmd_lens(args: argparse.Namespace) -> None:
    from . import plot
    from .lens import logit_lens
    from .results import save_lens

    hm = _load(args.model)
    lens = logit_lens(hm, args.prompt, ["all"])
    tops = lens.top_k(3, position=-1)
    target = _token_id(hm, args.target) if args.target else None
    for index, layer in enumerate(lens.layers):
        extra = ""
        if target is not None:
            extra = f"  rank({args.target!r})={int(lens.rank(target)[index, 0, -1])}"
        print(f"layer {layer:>3}: " + ", ".join(f"{t!r} {p:.2f}" for t, p in tops[index]) + extra)
    out = Path(args.out)
    plot.lens_figure(lens, str(hm.model_name), path=out / "logit_lens.png")
    summary = lens.summary(target=target, prompt=args.prompt, model=str(hm.model_name))
    save_lens(summary, out / "logit_lens.json")
    _write_report(f"hookscope lens: {hm.model_name}", [summary], out / "logit_lens.html")
    print(f"figure: {out / 'logit_lens.png'}; result and report: logit_lens.json, logit_lens.html")


def _cmd_report(args: argparse.Namespace) -> None:
    from .results import load_result

    results = [load_result(path) for path in args.results]
    path = _write_report(args.title, results, Path(args.out))
    print(f"{len(results)} result{'s' * (len(results) != 1)} -> {path}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out)


def _cmd_check(args: argparse.Namespace) -> None:
    report = _load(args.model).self_check(remember=args.remember)
    if not report.passed:
        raise CliError(
            f"{sum(not r.passed for r in report.rows)} self-check(s) failed (see the table above)"
        )


def _cmd_info(args: argparse.Namespace) -> None:
    from .points import KINDS
    from .vision_points import VISION_KINDS

    hm = _load(args.model)
    m = hm.model_map
    print(hm)
    print(f"spec: {'discovered' if m.discovered else 'table'} ({m.model_type})")
    parts = m.layers[0]
    for label, module in (
        ("decoder layer 0", parts.block),
        ("attention", parts.attention),
        ("mlp", parts.mlp),
        ("resid_mid site (input of)", parts.resid_mid_site),
        ("final norm", m.final_norm),
        ("embedding", m.embed),
    ):
        print(f"  {label:<26} {m.path_of(module) if module is not None else '(none)'}")
    print("activation points:")
    for kind in KINDS.values():
        if not _available(kind.name, hm, VISION_KINDS):
            continue  # e.g. vision points of a text-only model, post-norm kinds without norms
        name = {
            "model": kind.name,
            "layer": f"{kind.name}_{{0..{m.n_layers - 1}}}",
            "head": f"{kind.name}_L{{0..{m.n_layers - 1}}}H{{0..{m.n_heads - 1}}}",
        }[kind.scope]
        print(f"  {name:<34} {kind.shape:<22} {kind.definition}")


def _available(kind: str, hm, vision_kinds: frozenset) -> bool:
    """Whether this model has point ``kind`` (checked on layer 0 where it has layers)."""
    from .capture import locate
    from .errors import HookscopeError
    from .points import KINDS, Point

    if kind in vision_kinds:
        return hm.vision_map is not None
    if KINDS[kind].site.hook is None:  # read inside the attention function, a running mean...
        return True
    scope = KINDS[kind].scope
    point = Point(kind, None if scope == "model" else 0, 0 if scope == "head" else None)
    try:
        locate(point, hm.model_map)
    except HookscopeError:
        return False
    return True


MODEL_HELP = (
    "a model folder, a .gguf file or a hub id (default: the embedded SmolLM2-135M-Instruct)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hookscope",
        description="Look inside HuggingFace transformers: extract activations, patch, read the logit lens.",
        epilog="MODEL is a model folder, a .gguf file or a hub id; omit it for the embedded SmolLM2-135M-Instruct.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _verb(
        sub,
        "demo",
        "logit lens, patching and attention on the embedded model (offline)",
        "Run the tutorial on the embedded SmolLM2-135M-Instruct without any download: a logit\n"
        "lens, an activation-patching sweep and an attention pattern, written as figures.",
        "  hookscope demo\n  hookscope demo --out my-demo/",
    )
    demo.add_argument(
        "--out", default="hookscope-demo", help="output folder (default: %(default)s)"
    )
    demo.set_defaults(func=_cmd_demo)

    info = _verb(
        sub,
        "info",
        "architecture map and activation points of a model",
        "Print how hookscope maps a model: its family, layers, heads, and which activation\n"
        "points (resid_out, mlp_out, ...) can be extracted from it.",
        "  hookscope info\n  hookscope info HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    info.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    info.set_defaults(func=_cmd_info)

    check = _verb(
        sub,
        "check",
        "verify hookscope against a model: points, identities, padding, writes",
        "Check hookscope on a model before trusting it: every point against HF's own outputs,\n"
        "the residual identities, padded == unpadded batches, and that writes to points land.",
        "  hookscope check\n  hookscope check ./my-model --no-remember",
    )
    check.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    check.add_argument(
        "--no-remember",
        dest="remember",
        action="store_false",
        help="do not read or store the outcome in $HOOKSCOPE_CACHE/self_checks.json",
    )
    check.set_defaults(func=_cmd_check)
    _add_extract(sub)
    _add_patch(sub)
    _add_lens(sub)
    _add_report(sub)
    return parser


def _add_extract(sub) -> None:
    """The ``extract`` verb's arguments."""
    extract = _verb(
        sub,
        "extract",
        "extract activations of many prompts into a resumable store",
        "Run every prompt of --prompts through the model and stream the activations of\n"
        "--points at --positions into a resumable store in --out (read it with\n"
        "hookscope.ActivationStore.open). At least one point (or --logits-only) is required.",
        "  hookscope extract --prompts prompts.txt --points resid_out,mlp_out --out acts/\n"
        "  hookscope extract --prompts p.jsonl --points resid_out --layers 3 4 --positions last 0:2 "
        "--out acts/",
    )
    extract.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    extract.add_argument(
        "--prompts",
        required=True,
        help="a .txt file (one prompt a line, row i = line i + 1: no blank lines) or .jsonl "
        "({'text': ...} a line)",
    )
    extract.add_argument(
        "--positions",
        nargs="+",
        default=["last"],
        help="position items (default: last); slices as 2:5",
    )
    extract.add_argument(
        "--points",
        nargs="*",
        default=[],
        help="point kinds, space- or comma-separated, e.g. resid_out,mlp_out or resid_out attn_in",
    )
    extract.add_argument(
        "--logits-only",
        action="store_true",
        help="save only the logits (no --points): otherwise extract refuses to run without points",
    )
    extract.add_argument("--layers", nargs="*", type=int, help="only these layers (default: all)")
    extract.add_argument(
        "--batch-size", type=int, default=8, help="prompts per forward pass (default: %(default)s)"
    )
    extract.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on Ray: a cluster address, or 'local' for a local cluster",
    )
    extract.add_argument("--workers", type=int, default=2, help="Ray workers (with --ray)")
    extract.add_argument(
        "--out",
        required=True,
        help="output folder: a resumable store (manifest.json, one shard per batch); "
        "run the same command again to resume an interrupted run",
    )
    extract.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an existing store in --out first (only a hookscope store is ever deleted)",
    )
    _extraction_options(extract)
    extract.set_defaults(func=_cmd_extract)


def _add_patch(sub) -> None:
    """The ``patch`` verb's arguments."""
    patch = _verb(
        sub,
        "patch",
        "activation-patching sweep on a clean / corrupt prompt pair",
        "Copy activations of --clean into the run of --corrupt, one slot at a time (per\n"
        "position, layer or head), and plot how much of the logit difference\n"
        "correct - wrong each slot restores.",
        '  hookscope patch --clean "When Mary and John went, John gave it to" \\\n'
        '      --corrupt "When Mary and John went, Mary gave it to" \\\n'
        "      --correct ' Mary' --wrong ' John' --per layer",
    )
    patch.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    patch.add_argument("--clean", required=True, help="the prompt whose activations are copied")
    patch.add_argument(
        "--corrupt", required=True, help="the prompt they are copied into (same token length)"
    )
    patch.add_argument("--correct", required=True, help="the clean answer token, e.g. ' Mary'")
    patch.add_argument("--wrong", required=True, help="the corrupt answer token, e.g. ' John'")
    patch.add_argument(
        "--point",
        default="resid_out",
        choices=["resid_in", "resid_out", "attn_out", "mlp_out", "head"],
        help="the point patched (default: %(default)s)",
    )
    patch.add_argument(
        "--per",
        default="position",
        help="one slot per: position | layer | head | head_position (default: %(default)s)",
    )
    patch.add_argument(
        "--out", default="hookscope-patch", help="output folder (default: %(default)s)"
    )
    patch.set_defaults(func=_cmd_patch)


def _add_lens(sub) -> None:
    """The ``lens`` verb's arguments."""
    lens = _verb(
        sub,
        "lens",
        "logit lens of one prompt, layer by layer",
        "Decode the residual stream after every layer through the final norm and unembedding,\n"
        "and show what the model would predict at each depth (and the rank of --target).",
        "  hookscope lens --prompt 'The capital of France is' --target ' Paris'",
    )
    lens.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    lens.add_argument("--prompt", required=True, help="the prompt to read")
    lens.add_argument("--target", help="a token to follow, e.g. ' Paris'")
    lens.add_argument(
        "--out", default="hookscope-lens", help="output folder (default: %(default)s)"
    )
    lens.set_defaults(func=_cmd_lens)


def _add_report(sub) -> None:
    """The ``report`` verb's arguments."""
    report = _verb(
        sub,
        "report",
        "render saved results (patching, logit lens) as one HTML page",
        "Render results saved by `hookscope patch` (patching_*.json) and `hookscope lens`\n"
        "(logit_lens.json), or by PatchingResult.save / LensResult.save, into one\n"
        "self-contained HTML page (no network needed to open it): heatmaps and bar charts\n"
        "with axis titles, colour scales, tooltips and the numbers beside them.",
        "  hookscope report hookscope-patch/patching_resid_out.json --out report.html\n"
        "  hookscope report patch/patching_head.json lens/logit_lens.json --title 'IOI' "
        "--out ioi.html",
    )
    report.add_argument(
        "results", nargs="+", metavar="RESULT", help="saved result files (.json), in page order"
    )
    report.add_argument(
        "--out", default="hookscope-report.html", help="the page to write (default: %(default)s)"
    )
    report.add_argument(
        "--title", default="hookscope report", help="the page's title (default: %(default)s)"
    )
    report.set_defaults(func=_cmd_report)


def _is_store_error(error: Exception) -> bool:
    from .store import StoreError

    return isinstance(error, StoreError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        args.func(args)
    except HookscopeError as error:
        message = str(error).splitlines()[0]
        print(f"hookscope: error: {message}", file=sys.stderr)
        hint = next((h for key, h in _HINTS.items() if key in message), None)
        if args.command == "extract" and _is_store_error(error):
            hint = "pass --overwrite to replace that store, or choose another --out"
        print(f"hint: {hint or 'run `hookscope ' + args.command + ' --help`'}", file=sys.stderr)
        return 2
    except Interrupted as note:
        print(f"\nhookscope: {note}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nhookscope: interrupted", file=sys.stderr)
        return 130
    return 0
