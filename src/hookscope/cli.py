"""The ``hookscope`` command (also ``python -m hookscope``)."""

from __future__ import annotations

import argparse
import sys

from .errors import HookscopeError


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out)


def _cmd_info(args: argparse.Namespace) -> None:
    from .hooked_model import HookedModel
    from .points import KINDS

    hm = HookedModel.from_pretrained(args.model)
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
        name = kind.name if kind.scope == "model" else f"{kind.name}_{{0..{m.n_layers - 1}}}"
        print(f"  {name:<34} {kind.shape:<34} {kind.definition}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hookscope",
        description="Look inside HuggingFace transformers: extract activations at chosen positions.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the embedded default model (offline)")
    demo.add_argument(
        "--out", default="hookscope-demo", help="output folder (default: %(default)s)"
    )
    demo.set_defaults(func=_cmd_demo)
    info = sub.add_parser("info", help="architecture map and activation points of a model")
    info.add_argument(
        "model", nargs="?", default=None, help="folder, hub id or .gguf (default: embedded)"
    )
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        args.func(args)
    except HookscopeError as error:
        print(f"hookscope: error: {error}", file=sys.stderr)
        return 2
    return 0
