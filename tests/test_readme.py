"""The README's python code: every fenced python block runs as written.

Blocks run section by section (``## heading``), in order, in one namespace per
section, so a block may use what an earlier block of its section defined, and nothing
from another section. Sections are found in the README itself: a new block is run
without touching this file.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
# Sections known to hold python code: a parser that stops finding them fails loudly.
EXPECTED = {
    "Usage",
    "Multi-device and pod-scale training",
    "Flax Linen",
    "Flax NNX",
    "Per-example ALRC",
    "Gradient accumulation",
    "Checkpointing",
    "Logging diagnostics",
    "Cost per step",
}


def readme_sections() -> dict[str | None, list[str]]:
    """The python blocks of each ``## heading`` (up to the next heading of level <= 2).

    Lines inside code fences are never headings: a ``# comment`` in a block is not one.
    Blocks outside any ``##`` section are kept under ``None``.
    """
    sections: dict[str | None, list[str]] = {}
    current, fence, block = None, None, []
    for line in README.read_text().splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence, block = line.strip(), []
        elif fence is not None and line.strip() == "```":
            if fence == "```python":
                sections.setdefault(current, []).append("".join(block))
            fence = None
        elif fence is not None:
            block.append(line)
        elif re.match(r"#{1,2} ", line):
            current = line[3:].strip() if line.startswith("## ") else None
    return sections


SECTIONS = sorted(name for name in readme_sections() if name is not None)


def section_code(heading: str) -> list[str]:
    sections = readme_sections()
    assert heading in sections, f"README has no python code under '## {heading}'"
    return sections[heading]


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_section_runs(heading):
    namespace = {"__name__": f"readme_{heading}"}
    for block in section_code(heading):
        exec(compile(block, f"README.md ## {heading}", "exec"), namespace)


def test_every_python_block_is_run():
    sections = readme_sections()
    assert None not in sections, "a python block outside any '## ' section is not run"
    assert set(sections) >= EXPECTED
    num_blocks = sum(len(blocks) for blocks in sections.values())
    assert num_blocks == README.read_text().count("```python\n")


def test_section_extraction_stops_at_the_next_section():
    linen = section_code("Flax Linen")
    assert len(linen) == 1 and "nnx" not in linen[0] and "TrainState" in linen[0]
    assert any("# Orbax" in block for block in section_code("Checkpointing"))
