"""Sphinx configuration of bon-sr's documentation (MyST Markdown).

The source directory is the repository root, so that README.md (the front page) is a
document of the site and its links are checked with the rest; only README.md and
docs/*.md are documents (``include_patterns``). ``make docs`` (and ``make lint``) builds it as
``sphinx-build -E -W --keep-going -n -q -c docs -b html . build/docs``: every warning fails
that build, a link to a page or file that does not exist, a ``#anchor`` that no heading of
the target page makes (``myst_heading_anchors``), a page in no toctree.
"""

project = "bon-sr"
author = "bon-sr contributors"
copyright = "bon-sr contributors, Apache-2.0"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "docs/index"
include_patterns = ["README.md", "docs/*.md"]
exclude_patterns = [".git", ".venv", "build", "dist", "**/__pycache__"]

# GitHub's anchors (#choosing-a-selector) for headings down to ####, so that one link works
# on GitHub and in the site, and a missing anchor is a warning (myst.xref_missing)
myst_heading_anchors = 4
nitpicky = True

html_theme = "alabaster"
html_title = "bon-sr"
html_show_sourcelink = False
