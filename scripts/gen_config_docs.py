"""Regenerate docs/config.md from the config dataclasses (a test checks it is up to date).

    python scripts/gen_config_docs.py

The generator is :mod:`sftrl_jax.tools.config_docs`.
"""

from sftrl_jax.tools import config_docs

if __name__ == "__main__":
    print(f"wrote {config_docs.write()}")
