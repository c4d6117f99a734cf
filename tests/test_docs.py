"""The API reference (docs/api.rst) documents every public name of the package."""

import re
from pathlib import Path

import optax_logdamp
import optax_logdamp.flax

API = Path(__file__).resolve().parent.parent / "docs" / "api.rst"


def documented_names() -> set[str]:
    """Dotted names of the ``autofunction``/``autoclass`` directives, as written."""
    directives = re.findall(r"^\.\. auto(?:function|class):: ([\w.]+)", API.read_text(), re.M)
    return {name if "." in name else f"optax_logdamp.{name}" for name in directives}


def test_api_reference_lists_every_public_name():
    public = {f"optax_logdamp.{name}" for name in optax_logdamp.__all__}
    public |= {f"optax_logdamp.flax.{name}" for name in optax_logdamp.flax.__all__}
    missing = public - documented_names()
    assert not missing, f"add to docs/api.rst: {sorted(missing)}"
