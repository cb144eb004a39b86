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
