"""The README's activation-point table covers every point kind (docs do not drift)."""

from pathlib import Path

from hookscope.points import KINDS


def test_readme_lists_every_point_kind():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for kind in KINDS.values():
        key = f"`{kind.name}`" if kind.scope == "model" else f"`{kind.name}_{{l}}`"
        assert key in readme, f"README activation-point table misses {key}"
