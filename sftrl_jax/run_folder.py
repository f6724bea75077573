"""A run's output folder: usable, owned by one run at a time, and continued only by the same run.

- :func:`writable_folder` creates ``output_dir`` or says in one line why it cannot (a file is in the
  way, no permission, a read-only file system).
- :class:`RunLock` is ``output_dir/.lock``, created atomically and holding the owner's host, process
  id and start time. A second run on the same folder stops naming the owner; a lock whose process
  is gone (same host) is stale and taken over with a warning. A lock from another host cannot be
  checked and is refused with the file to delete if that run is known to be dead.
- :func:`check_continuity` compares a resumed run's settings with the ones its folder was started
  with (``config.yaml``) and refuses changes that break continuity -- other data, batch size, seed,
  optimizer or algorithm settings -- naming each, unless forced. The config's layout settings
  (:mod:`sftrl_jax.layout`: where it writes, how it logs, checkpoints and lays out devices and kernels)
  may change.
- :func:`owned_folder` puts these together, and refuses a folder holding a symbolic link (a run would write
  through it) or another command's run (its ``config.yaml`` records another ``kind:``).
- :func:`write_text_atomic` is how a run rewrites a record file: a kill leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

from .layout import layout_keys

log = logging.getLogger("sftrl_jax.run_folder")


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (the message says why and what to do)."""


def writable_folder(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Create ``path`` (and its parents) and check it can be written; one-line errors naming ``key``."""
    folder = Path(path)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"{key} {folder}: {parent} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"{key} {folder}: cannot write there ({err.strerror or err})") from None
    return folder


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path``'s content with ``text`` all at once: written to a temporary file in the same folder,
    flushed, then renamed over ``path``. A kill at any moment leaves the old file or the new one, never a
    truncated one; a symbolic link at ``path`` is replaced by the file, never written through."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# Folders inside a run folder that other tools manage, symbolic links included (wandb's ``latest-run``).
_FOREIGN_FOLDERS = frozenset({"wandb"})


def refuse_links(folder: str | os.PathLike, key: str = "output_dir") -> None:
    """Refuse a run folder holding a symbolic link: a run appends to and rewrites its files in place, so a
    planted link (``metrics.jsonl`` -> a file elsewhere) would make it write outside the folder."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        if Path(root) == folder:
            dirs[:] = [d for d in dirs if d not in _FOREIGN_FOLDERS]
        for name in (*dirs, *files):
            path = Path(root) / name
            if path.is_symlink():
                raise RunFolderError(f"{key} {folder}: {path} is a symbolic link, and a run never writes through "
                                     "one; remove it or choose another output_dir")


def recorded_kind(folder: Path) -> str | None:
    """The ``kind:`` of the run whose record (``config.yaml``) ``folder`` holds, or None."""
    import yaml

    try:
        record = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    kind = record.get("kind") if isinstance(record, dict) else None
    return kind if isinstance(kind, str) and kind else None


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """``with RunLock(folder):`` -- this process owns ``folder`` until the block ends."""

    def __init__(self, folder: str | os.PathLike, *, command: str = ""):
        self.path = Path(folder) / ".lock"
        self.command = command
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise RunFolderError(f"{self.path.parent}: could not take the run lock {self.path}")

    def _handle_existing(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid = holder["host"], int(holder["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: unreadable lock file (a run killed while writing it); taking it over", self.path)
            self.path.unlink(missing_ok=True)
            return
        who = f"{holder.get('command') or 'a run'} (pid {pid} on {host}, started {holder.get('started', '?')})"
        if host == socket.gethostname():
            if pid_alive(pid) and pid != os.getpid():
                raise RunFolderError(f"{self.path.parent} is in use by {who}; wait for it or choose another "
                                     "output_dir")
            log.warning("%s: stale lock of %s, whose process is gone; taking it over", self.path, who)
            self.path.unlink(missing_ok=True)
            return
        raise RunFolderError(f"{self.path.parent} is locked by {who}, which this host cannot check; if that "
                             f"run is dead, delete {self.path}")

    def __exit__(self, *exc) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def owned_folder(folder: str | os.PathLike, *, command: str, writer: bool = True):
    """``with owned_folder(output_dir, command=...) as out:`` -- the run's folder, created, checked writable
    and locked for the block on the writing process (``writer``); other processes only get the path. A folder
    holding a symbolic link, or another command's run (its ``config.yaml`` has another ``kind:``), is refused."""
    if not writer:
        yield Path(folder)
        return
    out = writable_folder(folder)
    refuse_links(out)
    with RunLock(out, command=command):
        kind, theirs = command.split()[-1], recorded_kind(out)
        if theirs is not None and theirs != kind:  # e.g. an evaluation would overwrite a training run's record
            raise RunFolderError(f"output_dir {out} holds a `sftrl-jax {theirs}` run (its config.yaml says kind: "
                                 f"{theirs}); {command} would overwrite its record: choose another output_dir")
        yield out


def _flatten(data: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def changed_settings(before: Mapping, after: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """``key: old -> new`` for every dotted key that differs, except ``ignore``d keys and sections."""
    ignore = tuple(ignore)
    old, new = _flatten(before), _flatten(after)
    changes = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in ignore):
            continue
        if old.get(key, "(unset)") != new.get(key, "(unset)"):
            changes.append(f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}")
    return changes


def check_continuity(record: Path, config, *, force: bool = False) -> None:
    """Refuse to resume with a run config (dataclass) whose settings differ from the run's ``record`` (its
    ``config.yaml``), except its layout settings (:func:`~sftrl_jax.layout.layout_keys` of its class)."""
    import yaml

    if not record.exists():
        return
    state = None  # what is wrong with the record, if anything
    try:
        before = yaml.safe_load(record.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())  # YAML's message spans lines: one line
        raise RunFolderError(f"{record}: the run's record is not valid YAML ({problem}); cannot check continuity") \
            from None
    except UnicodeDecodeError:
        before, state = None, "not UTF-8 text"
    if state is None and not (isinstance(before, dict) and before):
        state = "empty" if not before else f"not a mapping of settings (a YAML {type(before).__name__})"
    if state is not None:
        # an empty or damaged record holds no settings to compare: one line, not every setting as a change
        if force:
            log.warning("--force: resuming without checking settings (%s is %s)", record, state)
            return
        raise RunFolderError(f"{record}: the run's record of its settings is {state}, so --resume cannot check "
                             "that this is the same run; restore the file, or add --force to resume without "
                             "the check")
    refuse_resume(record.parent, changed_settings(before, dataclasses.asdict(config), ignore=layout_keys(type(config))),
                  what="settings", consequence="the old position would be applied to a different run", force=force)


def refuse_resume(folder: Path, changes: list[str], *, what: str, consequence: str, force: bool) -> None:
    """Stop a resume of the run in ``folder`` whose ``what`` (settings, training data) show ``changes`` from the
    run's record, naming them and ``consequence``; with ``force``, warn and go on."""
    if not changes:
        return
    text = "; ".join(changes)
    if force:
        log.warning("--force: resuming with %s that differ from the run's (%s)", what, text)
        return
    raise RunFolderError(f"{folder}: --resume with {what} that differ from the run's ({text}); {consequence}. "
                         "Use a new output_dir, or add --force")
