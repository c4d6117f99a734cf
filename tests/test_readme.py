"""The README: every fenced python block runs as written, and the set-up commands hold.

Blocks run section by section (``## heading``), in order, in one namespace per
section, so a block may use what an earlier block of its section defined, and nothing
from another section. Sections are found in the README itself: a new block is run
without touching this file. The guide's examples (``docs/``) run as ``{testcode}``
blocks under ``sphinx-build -b doctest``.
"""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Sections known to hold python code: a parser that stops finding them fails loudly.
EXPECTED = {"Usage"}
BENCHMARKS = (
    "benchmarks/spike_benchmark.py",
    "benchmarks/lm_spike_benchmark.py",
    "benchmarks/papers_benchmark.py",
)


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
    (usage,) = section_code("Usage")
    assert "import jax" in usage and "## " not in usage
    assert "Installation" not in readme_sections()  # bash blocks only


def test_usage_puts_spike_guard_in_front_of_the_standard_recipe():
    (usage,) = section_code("Usage")
    assert "    spike_guard(),\n    optax.clip_by_global_norm(1.0),\n    optax.adamw(" in usage
    assert "from optax_logdamp import spike_guard" in usage


def setup_commands() -> list[str]:
    """The command lines of the bash block under ``## Set-up: two commands``."""
    text = README.read_text()
    section = text[text.index("## Set-up: two commands") :]
    section = section[: section.index("\n## ", 1)]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_first_setup_command_installs_and_runs_the_benchmarks():
    first, second = setup_commands()
    steps = [shlex.split(step) for step in first.split("&&")]
    assert steps[0] == ["pip", "install", "-e", ".[examples]"]
    assert [step[1] for step in steps[1:]] == list(BENCHMARKS)
    assert all(step == ["python", step[1]] for step in steps[1:])  # defaults: a quick run
    assert second == 'pip install -e ".[test]" && python -m pytest'


def test_setup_command_benchmarks_exist():
    for script in BENCHMARKS:
        assert (ROOT / script).is_file(), f"the README's first command runs {script}"


def test_readme_links_resolve():
    """Relative links (docs pages, the figure) point at files of the repository."""
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    relative = [link for link in links if "://" not in link]
    assert any(link.endswith(".png") for link in relative)  # the figure
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
