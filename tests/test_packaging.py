"""What a user installs: licence, project metadata, sdist contents, install docs."""

import hashlib
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

# MD5 of the standard text of https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_0_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_file_is_the_apache_2_0_text_the_metadata_declares():
    assert pyproject()["license"] == "Apache-2.0"
    assert "LICENSE" in pyproject()["license-files"]
    license_text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.md5(license_text).hexdigest() == APACHE_2_0_MD5


def test_project_urls_are_declared():
    urls = pyproject()["urls"]
    assert urls and all(url.startswith("https://") for url in urls.values())


def test_sdist_carries_the_license_and_no_figures(tmp_path):
    builders = pytest.importorskip("hatchling.builders.sdist")
    (sdist,) = builders.SdistBuilder(str(ROOT)).build(directory=str(tmp_path))
    with tarfile.open(sdist) as archive:
        names = [Path(name).relative_to(Path(name).parts[0]) for name in archive.getnames()]
    assert Path("LICENSE") in names and Path("README.md") in names
    assert Path("optax_logdamp/py.typed") in names
    assert [name for name in names if name.suffix == ".png"] == []
    # Sources and docs only: no figure, cached benchmark result or other binary.
    text = {".py", ".md", ".rst", ".toml", ".txt", ".typed", ".css", ".cfg", ""}
    assert [name for name in names if name.suffix not in text] == []
    assert Path(sdist).stat().st_size < 400_000  # 216 KB with this change's sources


def test_readme_says_how_to_install_into_a_project():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Installation") :]
    section = section[: section.index("\n## ", 1)]
    assert "[flax]" in section  # the optional Flax glue
    assert "git+" in section  # from the repository, while not on PyPI
