"""The API reference (docs/api.rst) documents every public name of the package, and
the states document their fields where ``help()`` shows them (``_docs.py``)."""

import collections
import pydoc
import re
from pathlib import Path

import pytest

import optax_logdamp
import optax_logdamp.flax
from optax_logdamp._docs import document_fields

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


# ----------------------------------------------------------------- document_fields

STATE_CLASSES = [
    optax_logdamp.ALRCState,
    optax_logdamp.ALRCSignalsState,
    optax_logdamp.ALRCPerExampleState,
    optax_logdamp.LogDampenState,
]


@pytest.mark.parametrize("cls", STATE_CLASSES, ids=lambda cls: cls.__name__)
def test_state_fields_are_documented_where_help_shows_them(cls):
    """Each field's entry under ``Attributes:`` is its docstring: what help() shows."""
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "Alias for field number" not in text
    assert cls._fields
    for name in cls._fields:
        doc = getattr(cls, name).__doc__
        assert f"{name}\n |      {doc}" in text  # under "Data descriptors", by help()
        assert f"\n      {name}: {doc.split()[0]}" in cls.__doc__  # the Attributes: entry


def test_alrc_state_fields_lead_with_their_dtype():
    for name in optax_logdamp.ALRCState._fields:
        doc = getattr(optax_logdamp.ALRCState, name).__doc__
        assert doc.split(":")[0] in ("int32", "float32"), (name, doc)


def test_a_state_field_without_an_attributes_entry_is_an_error():
    def state_class(*fields):
        cls = collections.namedtuple("Documented", fields)
        cls.__doc__ = (
            "A state.\n\n    Attributes:\n      a: the first field,\n        on two lines.\n"
        )
        return cls

    assert document_fields(state_class("a")).a.__doc__ == "the first field, on two lines."
    with pytest.raises(ValueError, match=r"\['b'\] have no entry under 'Attributes:'"):
        document_fields(state_class("a", "b"))
