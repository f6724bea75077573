"""Render the generated blocks of README.md and docs/*.md from docs/results/ (``--help``: the commands and
options, from :mod:`sftrl_jax.tools.render_docs`)."""

import sys

from sftrl_jax.tools import render_docs

if __name__ == "__main__":
    sys.exit(render_docs.main())
