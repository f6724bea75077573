"""Docs that are generated from code stay in step with it."""

from pathlib import Path

import gen_config_docs  # scripts/ is on sys.path (conftest)


def test_config_reference_is_up_to_date():
    committed = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert committed == gen_config_docs.render(), "run: python scripts/gen_config_docs.py"
