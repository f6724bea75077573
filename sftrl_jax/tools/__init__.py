"""The repository's maintenance tools: the generated docs and the compile table.

- :mod:`.render_docs`: every generated block of README.md and docs/*.md, rendered from the result
  files under docs/results/ (and a run's report.json imported there with its provenance);
- :mod:`.compile_table`: the shipped configs compiled for their real targets (``sftrl-jax compile``),
  and the table of docs/scaling.md rendered from the results;
- :mod:`.config_docs`: docs/config.md, generated from the config dataclasses.

They work on the source checkout the package is imported from (:data:`ROOT`, an editable install);
``scripts/render_docs.py``, ``scripts/compile_configs.py`` and ``scripts/gen_config_docs.py`` are their
command lines. Nothing here is imported by the library itself.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout holding sftrl_jax/, docs/ and configs/
