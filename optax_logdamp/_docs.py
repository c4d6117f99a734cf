"""Documentation helpers: field docs of state ``NamedTuple``\\ s from their docstrings."""

from __future__ import annotations

import inspect
import re
from typing import TypeVar

NamedTupleType = TypeVar("NamedTupleType", bound=type)

_ENTRY = re.compile(r"(\w+): (.*)")


def _attribute_docs(docstring: str) -> dict[str, str]:
    """The entries of the Google-style ``Attributes:`` section of ``docstring``."""
    lines = inspect.cleandoc(docstring).splitlines()
    if "Attributes:" not in lines:
        return {}
    docs: dict[str, list[str]] = {}
    entry_indent, name = None, None
    for line in lines[lines.index("Attributes:") + 1 :]:
        indent = len(line) - len(line.lstrip())
        if not line.strip() or (entry_indent is not None and indent < entry_indent):
            break  # a blank line or a dedent ends the section
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.fullmatch(line.strip()) if indent == entry_indent else None
        if match:
            name = match.group(1)
            docs[name] = [match.group(2)]
        elif name is not None:
            docs[name].append(line.strip())
    return {name: " ".join(words) for name, words in docs.items()}


def document_fields(cls: NamedTupleType) -> NamedTupleType:
    """Class decorator: each field of a ``NamedTuple`` gets its ``Attributes:`` entry.

    ``help()`` and Sphinx show a field's own docstring, which is otherwise "Alias for
    field number N". The class docstring stays the one place where fields are described;
    a field without an entry is an error at import, so the two cannot drift apart.
    """
    docs = _attribute_docs(cls.__doc__ or "")
    missing = [name for name in cls._fields if name not in docs]
    if missing:
        raise ValueError(f"{cls.__name__}: fields {missing} have no entry under 'Attributes:'.")
    for name in cls._fields:
        getattr(cls, name).__doc__ = docs[name]
    return cls
