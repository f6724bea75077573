"""Compile every shipped TPU and GPU config for its real target on this CPU, then render the docs.

    python scripts/compile_configs.py                 # all runs (~15-25 min on 2 cores), then render
    python scripts/compile_configs.py --only sft_qwen # runs whose name contains this, then render
    python scripts/render_docs.py                     # re-render from the JSON files only (no compiling)

The runs and the table: :mod:`sftrl_jax.tools.compile_table`; the pages: :mod:`sftrl_jax.tools.render_docs`.
Needs the ``aot`` extra (``pip install -e '.[aot]'``).
"""

from sftrl_jax.tools import ROOT, compile_table, render_docs

if __name__ == "__main__":
    compile_table.main()
    for path in render_docs.write_docs():
        print(f"rendered {path.relative_to(ROOT)}")
