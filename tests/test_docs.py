"""Docs that are generated from code stay in step with it."""

from pathlib import Path

from sftrl_jax.tools import config_docs


def test_config_reference_is_up_to_date():
    committed = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert committed == config_docs.render(), "run: python scripts/gen_config_docs.py"
