"""The README's activation-point table covers every point kind (docs do not drift)."""

from pathlib import Path

from hookscope.points import KINDS


def test_readme_lists_every_point_kind():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for kind in KINDS.values():
        key = {
            "model": f"`{kind.name}`",
            "layer": f"`{kind.name}_{{l}}`",
            "head": f"`{kind.name}_L{{l}}H{{h}}`",
        }[kind.scope]
        assert key in readme, f"README activation-point table misses {key}"


def test_error_catalogue_is_up_to_date():
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    generated = subprocess.run(
        [sys.executable, str(root / "scripts" / "errors_catalogue.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert generated.strip() == (root / "docs" / "errors.md").read_text().strip(), (
        "docs/errors.md is stale: run python scripts/errors_catalogue.py --write"
    )
    assert "## positions" in generated and "**Fix.**" in generated
    modules_with_guides = generated.count("**Cause.** ") - generated.count("**Cause.** \n")
    assert modules_with_guides == generated.count("## "), "every module has a cause and a fix"
