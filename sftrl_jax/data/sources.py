"""Where training rows come from: local parquet/JSON(L) files, Hugging Face dataset ids, TFDS.

Every source yields ``(source_name, row_index, row)`` so that a bad row can be reported as
``data/train.parquet row 17: ...`` and found again. Local files are loaded one at a time (not as
one concatenated dataset) so the row index is the 0-based row within that file and files whose
schemas differ slightly (a missing optional column) do not fail a cast. ``datasets`` memory-maps
its Arrow cache, so iterating a file does not hold it in host memory.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# File extension -> ``datasets`` builder. A ``.json`` file may hold a list of rows or JSON lines;
# the ``json`` builder reads both.
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
TFDS_PREFIX = "tfds:"
_GLOB_CHARS = frozenset("*?[")

Row = tuple[str, int, dict]


def load_rows(spec: str | os.PathLike | Sequence[str | os.PathLike], *, split: str = "train") -> Iterator[Row]:
    """Yield ``(source_name, row_index, row)`` for every row of every source in ``spec``.

    Each entry of ``spec`` is one of:

    - a local file, directory or glob (``.parquet``, ``.jsonl``, ``.json``): each matched file is
      one source named by its path, rows indexed from 0 within the file. A directory is loaded with
      ``datasets.load_dataset(dir, split=split)`` (a local clone of a hub dataset repository).
    - ``tfds:NAME[/SPLIT]``: a TensorFlow Datasets dataset (``pip install 'sftrl-jax[tfds]'``);
      without ``/SPLIT`` the ``split`` argument is used. Bytes are decoded to ``str``.
    - anything else: a Hugging Face dataset id, ``datasets.load_dataset(id, split=split)``.

    Sources are opened lazily, in order, so a later source's errors surface only when reached.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("no data source given")
    for one in specs:
        one = os.fspath(one)
        if one.startswith(TFDS_PREFIX):
            yield from _tfds_rows(one, split)
        elif _is_local(one):
            yield from _local_rows(one, split)
        else:
            yield from _hub_rows(one, split)


def _is_local(spec: str) -> bool:
    """A spec is a local path if it exists, is a glob, names a data file or cannot be a hub id.

    Hub ids are ``name`` or ``owner/name``; a spec with a supported extension, glob characters, an
    absolute/relative/home prefix or more than one ``/`` is a path, so a typo in a path gives
    "no such file" rather than a confusing hub lookup error.
    """
    if os.path.exists(spec) or _GLOB_CHARS & set(spec):
        return True
    if Path(spec).suffix.lower() in FILE_BUILDERS:
        return True
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1


def _local_rows(spec: str, split: str) -> Iterator[Row]:
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        yield from _dataset_rows(spec, _load_dataset(expanded, split=split))
        return
    if _GLOB_CHARS & set(expanded):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    else:
        files = [expanded] if os.path.isfile(expanded) else []
    if not files:
        raise FileNotFoundError(f"no data file matches {spec!r}")
    for path in files:  # check every extension before reading anything
        if Path(path).suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"{path}: unsupported data file extension {Path(path).suffix!r} "
                             f"(expected one of {', '.join(FILE_BUILDERS)})")
    for path in files:
        builder = FILE_BUILDERS[Path(path).suffix.lower()]
        yield from _dataset_rows(path, _load_dataset(builder, data_files=str(path), split="train"))


def _hub_rows(dataset_id: str, split: str) -> Iterator[Row]:
    yield from _dataset_rows(dataset_id, _load_dataset(dataset_id, split=split))


def _load_dataset(*args: Any, **kwargs: Any):
    import datasets  # imported here so that importing sftrl_jax.data stays cheap

    return datasets.load_dataset(*args, **kwargs)


def _dataset_rows(name: str, dataset) -> Iterator[Row]:
    for index, row in enumerate(dataset):
        yield name, index, row


def _tfds_rows(spec: str, split: str) -> Iterator[Row]:
    """``tfds:NAME[/SPLIT]``; a NAME with a config (``wmt14/de-en``) needs the split spelled out."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(f"{spec!r} needs tensorflow-datasets: pip install 'sftrl-jax[tfds]'") from error
    body = spec[len(TFDS_PREFIX):]
    name, _, explicit_split = body.rpartition("/")
    if not name:
        name, explicit_split = body, ""
    split = explicit_split or split
    dataset = tfds.load(name, split=split)
    source = f"{TFDS_PREFIX}{name}/{split}"
    for index, row in enumerate(tfds.as_numpy(dataset)):
        yield source, index, _decode(row)


def _decode(value: Any) -> Any:
    """TFDS numpy values -> plain Python: bytes to ``str``, arrays to lists, scalars to numbers."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode(item) for item in value]
    if hasattr(value, "tolist"):  # numpy array or scalar
        return _decode(value.tolist())
    return value
