"""Fingerprints of what a run's results depend on: the bytes of its data files and of its model folder, so a
resume can tell the same path with other content from the same content (evaluation's settings file, the
training loop's ``data_fingerprint.json``, the Arrow cache of a local data file)."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

# Model-folder files that do not shape the output (documentation, licences); names starting with "." are
# skipped too (.git, caches)
_UNREAD_MODEL_FILES = ("README", "LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
_FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones (the weights) are sampled
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read once, streaming)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sampled_digest(path: Path) -> str:
    """A cheap digest of a large file: its size and modification time, a safetensors file's whole header
    (every tensor's name, dtype, shape and offsets), and ``_SAMPLES`` blocks of ``_SAMPLE_BYTES`` spread
    evenly over the file, the last block included. Reads about 4 MB whatever the size: a re-export or
    another model changes the sampled bytes, an edit in place changes the modification time, and a
    same-size copy with the old time (``cp -p``) changes the sampled bytes unless it differs only between
    them."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as f:
        if path.suffix == ".safetensors":
            head = f.read(8)
            digest.update(head)
            if len(head) == 8:
                digest.update(f.read(min(int.from_bytes(head, "little"), stat.st_size)))
        for k in range(_SAMPLES):
            f.seek(max(0, (stat.st_size - _SAMPLE_BYTES) * k // (_SAMPLES - 1)))
            digest.update(f.read(_SAMPLE_BYTES))
    return f"sampled:{digest.hexdigest()}"


def model_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """A digest of every file of the model folder that can shape generations (the weights, ``config.json``,
    ``generation_config.json``, the tokenizer files, ``chat_template.jinja``, ...): every top-level file
    except documentation and licences (``_UNREAD_MODEL_FILES``) and hidden ones. Files up to 64 MiB are
    hashed whole (SHA-256); larger ones, the weights, by :func:`_sampled_digest`, so a 15 GB model costs
    milliseconds rather than a full read."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.upper().startswith(_UNREAD_MODEL_FILES) or not path.is_file():
            continue
        out[path.name] = file_sha256(path) if path.stat().st_size <= _FULL_HASH_BYTES else _sampled_digest(path)
    return out


def data_fingerprint(files: Sequence[str]) -> dict[str, str]:
    """The SHA-256 of every local file ``files`` names (globs expanded, directories walked), by path; a hub
    dataset id or ``tfds:`` name stands for itself. Hashing reads each file once (about 1 GB/s)."""
    out = {}
    for spec in files:
        expanded = os.path.expanduser(str(spec))
        if os.path.isdir(expanded):
            paths = sorted(p for p in Path(expanded).rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            paths = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not paths:
            out[str(spec)] = "(not a local file)"
        for path in paths:
            out[str(path)] = file_sha256(path)
    return out
