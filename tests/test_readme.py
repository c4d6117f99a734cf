"""The README's integration sections: every python block under them runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = [
    "Flax Linen",
    "Flax NNX",
    "Per-example ALRC",
    "Checkpointing",
    "Logging diagnostics",
    "Cost per step",
]


def readme_sections() -> dict[str, list[str]]:
    """The python blocks of each ``## heading`` (up to the next heading of level <= 2).

    Lines inside code fences are never headings: a ``# comment`` in a block is not one.
    """
    sections: dict[str, list[str]] = {}
    current, fence, block = None, None, []
    for line in README.read_text().splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence, block = line.strip(), []
        elif fence is not None and line.strip() == "```":
            if fence == "```python" and current is not None:
                sections[current].append("".join(block))
            fence = None
        elif fence is not None:
            block.append(line)
        elif re.match(r"#{1,2} ", line):
            current = line[3:].strip() if line.startswith("## ") else None
            if current is not None:
                sections.setdefault(current, [])
    return sections


def section_code(heading: str) -> list[str]:
    sections = readme_sections()
    assert heading in sections, f"README has no section '## {heading}'"
    return sections[heading]


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_section_runs(heading, capsys):
    blocks = section_code(heading)
    assert blocks, f"README section '{heading}' has no python code"
    namespace = {"__name__": f"readme_{heading}"}
    for block in blocks:
        exec(compile(block, f"README.md ## {heading}", "exec"), namespace)


def test_section_extraction_stops_at_the_next_section():
    linen = section_code("Flax Linen")
    assert len(linen) == 1 and "nnx" not in linen[0] and "TrainState" in linen[0]
    assert any("# Orbax" in block for block in section_code("Checkpointing"))
