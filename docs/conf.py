"""Sphinx configuration of the py-preload docs site (build: see docs/index.md, "Build the site")."""

from __future__ import annotations

import os
import sys

# The CLI reference (cli.md) is generated from the click commands of this checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

project = "py-preload"
author = "py-preload contributors"
extensions = ["myst_parser", "sphinx_click"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "py-preload"
# Markdown links to headings (`page.md#a-heading`) resolve, and a broken one is a warning:
# the strict build (-W, tests/test_docs.py) turns it into an error.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
# Figures carry dates; a page needs no "last updated" of its own.
html_last_updated_fmt = None
nitpicky = True
# The click docstrings are reStructuredText to sphinx-click: `x` is code there, as in --help,
# and `--` stays two dashes.
default_role = "literal"
smartquotes = False
