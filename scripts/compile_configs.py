"""Compile every shipped TPU and GPU config for its target on this CPU, then render the docs (``--help``: the
commands, from :mod:`sftrl_jax.tools.compile_table`; needs the ``aot`` extra)."""

from sftrl_jax.tools import ROOT, compile_table, render_docs

if __name__ == "__main__":
    compile_table.main()
    for path in render_docs.write_docs():
        print(f"rendered {path.relative_to(ROOT)}")
