"""Sphinx configuration of the optax_logdamp documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors); run
the pages' code: ``sphinx-build -W -b doctest docs docs/_build/doctest``.

The build needs no network. Two things would otherwise reach for it:

- Math is rendered by MathJax, loaded from its CDN unless a copy lies in
  ``docs/_static/mathjax/`` (``python docs/screenshot.py`` puts one there from the npm
  registry): then the site renders math offline.
- Links into the Python, NumPy, JAX, Optax and Flax docs (intersphinx) fetch those
  sites' inventories, so they are made only with ``OPTAX_LOGDAMP_INTERSPHINX=1``.
"""

from __future__ import annotations

import doctest
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the package of this checkout, installed or not

import optax_logdamp  # noqa: E402

project = "optax_logdamp"
author = "optax_logdamp developers"
copyright = "optax_logdamp developers"
release = optax_logdamp.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_static/mathjax"]

# Markdown pages (MyST): $...$ math, ::: fences, heading anchors for #links.
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# API reference: Google-style docstrings, signatures as written in the source.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# State fields: the Attributes: sections say each field's dtype and meaning; the
# annotation (``jax.Array``, printed as ``jax.jaxlib._jax.Array``) would add nothing.
napoleon_attr_annotations = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_type_aliases = {
    "chex.Numeric": "chex.Numeric",
    "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
}

# `sphinx-build -b doctest` runs the pages' {testcode} blocks. The docstrings' own
# examples run under pytest (--doctest-modules), so they are not run twice here.
doctest_test_doctest_blocks = ""
doctest_default_flags = (
    doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
)

if os.environ.get("OPTAX_LOGDAMP_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "jax": ("https://docs.jax.dev/en/latest", None),
        "optax": ("https://optax.readthedocs.io/en/latest", None),
        "flax": ("https://flax.readthedocs.io/en/latest", None),
    }

if (DOCS / "_static" / "mathjax" / "tex-svg.js").exists():
    mathjax_path = "mathjax/tex-svg.js"  # relative to _static: works offline

html_theme = "sphinx_book_theme"
html_title = "optax_logdamp"
html_static_path = ["_static"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "navbar_persistent": [],  # the sidebar has the search field: no second one above it
}
html_css_files = ["custom.css"]


def _readable_signature(app, what, name, obj, options, signature, return_annotation):
    """``chex.Numeric | None``, not ``TypeAliasForwardRef('chex.Numeric') | None``.

    Sphinx keeps an alias of ``autodoc_type_aliases`` unexpanded, but inside a union
    it prints the wrapper object's repr.
    """
    alias = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")
    if signature:
        signature = alias.sub(r"\1", signature)
    if return_annotation:
        return_annotation = alias.sub(r"\1", return_annotation)
    return signature, return_annotation


def _real_signatures_when_running_code(app):
    """The doctest builder runs the pages' code: leave the functions' signatures alone.

    ``autodoc_preserve_defaults`` writes onto each documented function a
    ``__signature__`` whose defaults are wrappers of their source text (for display).
    ``optax.inject_hyperparams`` reads defaults from ``inspect.signature``, so a page
    that wraps ``logadam`` in it would get those wrappers for ``b1``, ``b2`` and ``eps``.
    """
    if app.builder.name == "doctest":
        app.config.autodoc_preserve_defaults = False


def setup(app):
    app.connect("builder-inited", _real_signatures_when_running_code)
    app.connect("autodoc-process-signature", _readable_signature)
