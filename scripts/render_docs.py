"""Render every generated table in README.md and docs/*.md from the result files under docs/results/.

    python scripts/render_docs.py                     # re-render every marked block from docs/results/
    python scripts/render_docs.py --check             # exit 1 (and say which) if a page is not up to date
    python scripts/render_docs.py --import-demo runs/demo/report.json
    python scripts/render_docs.py --import-repro-bugs runs/repro_bugs/report.json
    python scripts/render_docs.py --import-repro-coupling runs/repro_coupling/report.json
    python scripts/render_docs.py --import-repro-mixed runs/repro_mixed/report.json

The renderer, its blocks and options: :mod:`sftrl_jax.tools.render_docs`.
"""

import sys

from sftrl_jax.tools import render_docs

if __name__ == "__main__":
    sys.exit(render_docs.main())
