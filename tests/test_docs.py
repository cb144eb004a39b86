"""The README's activation-point table covers every point kind (docs do not drift)."""

from pathlib import Path

from hookscope.points import KINDS, readme_table


def test_readme_point_table_is_rendered_from_the_point_table():
    import importlib.util

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location(
        "points_table", root / "scripts" / "points_table.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    section = script.readme_section((root / "README.md").read_text())
    assert section == readme_table(), (
        "README's activation-point table is stale: run python scripts/points_table.py --write"
    )
    for kind in KINDS.values():  # the rendering itself lists every kind with its flag
        key = {"model": "`{k}`", "layer": "`{k}_{{l}}`", "head": "`{k}_L{{l}}H{{h}}`"}[kind.scope]
        assert f"| {key.format(k=kind.name)} |" in section and f"`{kind.flag}`" in section


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
