"""Where training rows come from: local parquet/JSON(L) files, Hugging Face dataset ids, TFDS.

Every source yields ``(source_name, row_index, row)`` so that a bad row can be reported as
``data/train.parquet row 17: ...`` and found again. Local files are loaded one at a time (not as
one concatenated dataset) so the row index is the 0-based row within that file and files whose
schemas differ slightly (a missing optional column) do not fail a cast. ``datasets`` memory-maps
its Arrow cache, so iterating a file does not hold it in host memory.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# File extension -> ``datasets`` builder. A ``.json`` file may hold a list of rows or JSON lines;
# the ``json`` builder reads both.
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
TFDS_PREFIX = "tfds:"
_GLOB_CHARS = frozenset("*?[")
# A line of a JSON-lines file longer than this is a bad row, skipped without being parsed: reading a 50 MB
# line (``datasets``, then the tokenizer) took about 10 GB of memory before any length check dropped it.
MAX_ROW_BYTES = 4 << 20
# A file name extension: a dot and a letter first (hub ids may end in a version, ``AI-MO/NuminaMath-1.5``).
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")


class ExtraNotInstalled(ImportError, RuntimeError):
    """A source needs an optional extra that is not installed (the message names the pip command)."""

Row = tuple[str, int, "dict | UnreadableRow"]


def load_rows(spec: str | os.PathLike | Sequence[str | os.PathLike], *, split: str = "train") -> Iterator[Row]:
    """Yield ``(source_name, row_index, row)`` for every row of every source in ``spec``.

    Each entry of ``spec`` is one of:

    - a local file, directory or glob (``.parquet``, ``.jsonl``, ``.json``): each matched file is
      one source named by its path, rows indexed from 0 within the file. A directory is loaded with
      ``datasets.load_dataset(dir, split=split)`` (a local clone of a hub dataset repository).
    - ``tfds:NAME[/SPLIT]``: a TensorFlow Datasets dataset (``pip install 'sftrl-jax[tfds]'``);
      without ``/SPLIT`` the ``split`` argument is used. Bytes are decoded to ``str``.
    - anything else: a Hugging Face dataset id, ``datasets.load_dataset(id, split=split)``; ``ID:CONFIG``
      names one of its configurations (``nyu-mll/glue:cola``).

    Sources are opened lazily, in order, so a later source's errors surface only when reached.
    An empty or unreadable file is a ``ValueError`` naming it; a line of a JSON(L) file that is not
    UTF-8 or not valid JSON is yielded as an :class:`UnreadableRow` (a bad row) naming the line.
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

    Hub ids are ``name`` or ``owner/name``; a spec with a supported extension, a ``/`` and any file
    extension, glob characters, an absolute/relative/home prefix or more than one ``/`` is a path, so a
    typo in a path gives "no such file" rather than a confusing hub lookup error.
    """
    if os.path.exists(spec) or _GLOB_CHARS & set(spec):
        return True
    if Path(spec).suffix.lower() in FILE_BUILDERS:
        return True
    if "/" in spec and _FILE_EXTENSION.search(spec):  # "data/train.parqet": a path with a mistyped extension
        return True
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1


def _local_rows(spec: str, split: str) -> Iterator[Row]:
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        scripts = sorted(Path(expanded).glob("*.py"))
        if scripts:  # a loading script: code from the folder, which is never run
            raise ValueError(f"{spec}: the data folder holds a loading script ({scripts[0].name}); sftrl-jax runs "
                             "no code from a data folder: point data at its .parquet / .jsonl / .json files")
        yield from _dataset_rows(spec, _load_dataset(expanded, split=split))
        return
    if _GLOB_CHARS & set(expanded):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    else:
        files = [expanded] if os.path.isfile(expanded) else []
    if not files:
        if _GLOB_CHARS & set(expanded):
            raise FileNotFoundError(f"no data file matches {spec!r}")
        raise FileNotFoundError(f"{spec}: no such file (a local path; check its spelling)")
    for path in files:  # check every extension before reading anything
        if Path(path).suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"{path}: unsupported data file extension {Path(path).suffix!r} "
                             f"(expected one of {', '.join(FILE_BUILDERS)})")
    for path in files:
        yield from _file_rows(path)


def _file_rows(path: str) -> Iterator[Row]:
    """Rows of one local data file; a file that cannot be read is reported by name.

    An empty or unreadable parquet file is a ``ValueError`` naming the file. A JSON(L) file that
    ``datasets`` cannot read (a malformed line, bytes that are not UTF-8, rows whose types disagree)
    is read again line by line: good lines are rows as usual and each bad line is yielded as an
    :class:`UnreadableRow` naming its line, which the row consumers report or skip like any other
    bad row (``on_bad_row``). A JSON-lines file with a line over ``MAX_ROW_BYTES`` is read line by line
    from the start, that line yielded as an :class:`UnreadableRow` without being held in memory.
    """
    builder = FILE_BUILDERS[Path(path).suffix.lower()]
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes), no rows to read")
    if builder == "json" and _has_oversized_line(path):  # read line by line: the long lines are skipped unread
        yield from _json_rows(path)
        return
    try:
        dataset = _load_dataset(builder, data_files=str(path), split="train", cache_dir=_content_cache_dir(path))
    except Exception as err:  # noqa: BLE001 - re-raised below with the file named
        if builder != "json":
            raise ValueError(f"{path}: cannot read as {builder}: {_root_cause(err)}") from None
        yield from _json_rows(path)
        return
    done = 0  # ``datasets`` stores bytes that are not UTF-8 and fails only when they are read back
    try:
        for _, index, row in _dataset_rows(path, dataset):
            yield path, index, row
            done = index + 1
    except Exception as err:  # noqa: BLE001 - re-read, or re-raised with the file and row named
        if builder != "json":
            raise ValueError(f"{path}: cannot read row {done}: {_root_cause(err)}") from None
        for row in _json_rows(path):
            if row[1] >= done:
                yield row


class UnreadableRow:
    """A row of a local JSON(L) file that could not be parsed (``problem`` names its line).

    Yielded by :func:`load_rows` in place of the row's dict so that a malformed line is a bad row
    (skipped and counted, or an error with ``on_bad_row=error``) rather than a failure of the file.
    """

    def __init__(self, problem: str):
        self.problem = problem

    def __repr__(self) -> str:
        return f"UnreadableRow({self.problem!r})"


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _json_rows(path: str) -> Iterator[Row]:
    """Read a JSON(L) file without ``datasets``: a JSON array of rows, or one JSON object a line."""
    with open(path, "rb") as file:
        head = file.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        head = head[3:].lstrip()
    if head.startswith(b"["):  # one JSON array of rows: all or nothing
        yield from _json_array_rows(path)
        return
    index = 0
    with open(path, "rb") as file:
        for number, raw in enumerate(_bounded_lines(file), start=1):
            if isinstance(raw, int):  # the size of a line over MAX_ROW_BYTES, which was never held in memory
                yield path, index, UnreadableRow(f"line {number} is {raw} bytes, over the {MAX_ROW_BYTES} bytes "
                                                 "a row may have (not parsed)")
                index += 1
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                row: Any = UnreadableRow(f"line {number} is not UTF-8 text "
                                         f"(byte 0x{raw[err.start]:02x} at column {err.start + 1})")
            else:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    row = UnreadableRow(f"line {number} is not valid JSON ({err.msg} at column {err.colno})")
                else:
                    if not isinstance(row, dict):
                        row = UnreadableRow(f"line {number} is a JSON {type(row).__name__}, not an object")
            yield path, index, row
            index += 1


def _bounded_lines(file) -> Iterator[bytes | int]:
    """The lines of binary ``file``, each read into memory only up to ``MAX_ROW_BYTES``: a longer line is
    read past in 1 MiB pieces and yielded as its size in bytes (an ``int``) instead of its content."""
    while raw := file.readline(MAX_ROW_BYTES + 1):
        if len(raw) <= MAX_ROW_BYTES or raw.endswith(b"\n"):
            yield raw
            continue
        size = len(raw)
        while piece := file.readline(1 << 20):
            size += len(piece)
            if piece.endswith(b"\n"):
                break
        yield size


def _has_oversized_line(path: str) -> bool:
    """Whether a JSON-lines file has a line longer than ``MAX_ROW_BYTES`` (a JSON array file, whose rows may
    share one line, never does). One pass in 1 MiB blocks, counting the bytes since the last newline."""
    with open(path, "rb") as file:
        if file.read(4096).lstrip().lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"["):
            return False
        file.seek(0)
        run = 0
        while block := file.read(1 << 20):
            last = block.rfind(b"\n")
            if last < 0:
                run += len(block)
            else:
                if run + block.find(b"\n") > MAX_ROW_BYTES:
                    return True
                run = len(block) - last - 1
            if run > MAX_ROW_BYTES:
                return True
    return False


def _json_array_rows(path: str) -> Iterator[Row]:
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    for index, row in enumerate(rows):
        yield path, index, (row if isinstance(row, dict) else
                            UnreadableRow(f"element {index} is a JSON {type(row).__name__}, not an object"))


def _hub_rows(dataset_id: str, split: str) -> Iterator[Row]:
    """``ID`` or ``ID:CONFIG`` (a dataset with several configurations, e.g. ``nyu-mll/glue:cola``)."""
    name, _, config = dataset_id.partition(":")
    args = (name, config) if config else (name,)
    yield from _dataset_rows(dataset_id, _load_dataset(*args, split=split))


def _content_cache_dir(path: str) -> str:
    """The ``datasets`` cache folder for ``path``'s current bytes.

    ``datasets`` keys its Arrow cache of a local file on the path and modification time, so a file
    replaced by one with the same time (``cp -p``, a restored backup, a coarse file system clock)
    would be served from the old cache. Keying the folder on a hash of the content makes that
    impossible; an unchanged file still reuses its cache (hashing reads the file once, ~1 GB/s).
    """
    import datasets

    from ..fingerprint import file_sha256

    return str(Path(datasets.config.HF_DATASETS_CACHE) / "sftrl_jax-by-content" / file_sha256(path)[:32])


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
        raise ExtraNotInstalled(f"{spec!r} needs tensorflow-datasets, which is not installed: "
                                f"pip install 'sftrl-jax[tfds]'") from error
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
