"""Load dataset rows from a local file, a local directory or the Hugging Face Hub.

Local ``.jsonl`` and ``.json`` files are read with the standard library, so the built-in loaders and
their tests work without the optional ``datasets`` package. ``datasets`` (extra ``tasks``) is imported
only for Hub names and ``.parquet`` files (through its dependency pyarrow).

A directory is searched (two levels deep) for files named after the split: ``test.jsonl``,
``train-00000-of-00001.parquet``, ``main/test.json``...; with a ``config``, files under a folder of
that name are preferred, which matches the layout of a downloaded Hub snapshot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from dmpo_fast.tasks.base import Task, check_count, check_split, stable_rng

INSTALL_HINT = 'pip install "dmpo-fast[tasks]"'
LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet")


def _require(module: str, why: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"{why} needs the optional package '{module}': {INSTALL_HINT}") from e


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def _read_json(path: str, split: str) -> list[dict]:
    """A JSON list of objects, an object holding such a list under the split's name or "data"/"rows",
    or (as the Hub's json loader allows) JSON Lines in a .json file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)
    if isinstance(data, Mapping):
        for key in (split, "data", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            if all(isinstance(v, list) for v in data.values()) and data:  # column-oriented {"col": [...]}
                n = len(next(iter(data.values())))
                if any(len(v) != n for v in data.values()):
                    raise ValueError(f"{path}: columns have different lengths")
                return [{k: v[i] for k, v in data.items()} for i in range(n)]
            raise ValueError(
                f"{path}: expected a list of rows or a mapping with a '{split}', 'data' or 'rows' list"
            )
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of objects")
    return data


def _read_parquet(path: str) -> list[dict]:
    _require("pyarrow", f"reading {path}")
    import pyarrow.parquet as pq  # noqa: PLC0415  (optional dependency, comes with datasets)

    return pq.read_table(path).to_pylist()


def read_file(path: str, split: str = "train") -> list[dict]:
    """Rows of one local .jsonl / .json / .parquet file."""
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.endswith(".json"):
        return _read_json(path, split)
    if path.endswith(".parquet"):
        return _read_parquet(path)
    raise ValueError(f"unsupported data file {path!r}: expected one of {LOCAL_EXTENSIONS}")


def _split_files(directory: str, split: str, config: str | None) -> list[str]:
    found: list[tuple[int, str]] = []
    base_depth = directory.rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(directory):
        depth = root.rstrip(os.sep).count(os.sep) - base_depth
        if depth >= 2:
            dirs[:] = []
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext not in LOCAL_EXTENSIONS:
                continue
            if stem == split or stem.startswith((f"{split}-", f"{split}_", f"{split}.")):
                in_config = config is not None and os.path.basename(root) == config
                found.append((0 if in_config else 1, os.path.join(root, name)))
    if not found:
        return []
    best = min(rank for rank, _ in found)
    return sorted(p for rank, p in found if rank == best)


def looks_local(source: str) -> bool:
    """Whether ``source`` names a local path rather than a Hub dataset ("owner/name")."""
    return (
        os.path.exists(os.path.expanduser(source))
        or source.endswith(LOCAL_EXTENSIONS)
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1  # a Hub id is "name" or "owner/name"
    )


def load_rows(source: str, split: str, *, config: str | None = None) -> list[dict]:
    """Rows of ``split`` from ``source``: a .jsonl/.json/.parquet file (used as is, whatever the split),
    a directory holding per-split files, or a Hub dataset name (needs ``datasets``)."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty path or Hub dataset name, got {source!r}")
    if looks_local(source):
        path = os.path.expanduser(source)
        if os.path.isfile(path):
            return read_file(path, split)
        if os.path.isdir(path):
            files = _split_files(path, split, config)
            if files:
                rows: list[dict] = []
                for f in files:
                    rows.extend(read_file(f, split))
                return rows
            raise ValueError(
                f"no file for split {split!r} in directory {source!r}: expected e.g. {split}.jsonl, "
                f"{split}.json or {split}-00000-of-00001.parquet"
            )
        raise ValueError(f"data file or directory {source!r} does not exist")
    datasets = _require("datasets", f"loading the Hub dataset {source!r}")
    ds = datasets.load_dataset(source, config, split=split)
    return [dict(row) for row in ds]


# --------------------------------------------------------------------------- tasks backed by a dataset
@dataclass
class DatasetTask(Task):
    """A task whose rows come from ``load_rows``. ``source`` is a Hub name, a local file or directory,
    or a mapping ``{"train": ..., "test": ...}`` of those (a single file serves every split).
    ``train_split=None`` means the source has no training split. Rows are shuffled by ``seed``
    (``seed=None`` keeps the source order) before the first ``n`` are taken."""

    source: str | Mapping[str, str] = ""
    config: str | None = None
    train_split: str | None = "train"
    test_split: str = "test"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def convert(self, row: dict) -> dict:
        """One source row -> one task row (with ``prompt`` and ``reference``)."""
        raise NotImplementedError

    def _locate(self, split: str) -> tuple[str, str]:
        split_name = self.train_split if split == "train" else self.test_split
        if isinstance(self.source, Mapping):
            if split not in self.source:
                raise ValueError(
                    f"{self.name}: source has no entry for split {split!r} (got keys {sorted(self.source)})"
                )
            return self.source[split], split_name or split
        if split_name is None:
            raise ValueError(
                f"{self.name}: {self.source!r} has no {split} split; pass "
                f"source={{'train': <data>, 'test': {self.source!r}}}"
            )
        return self.source, split_name

    def load(self, split: str) -> list[dict]:
        """All converted rows of ``split`` in source order (read once, then cached)."""
        check_split(split)
        if split not in self._cache:
            source, split_name = self._locate(split)
            self._cache[split] = [
                self.convert(dict(r)) for r in load_rows(source, split_name, config=self.config)
            ]
        return self._cache[split]

    def rows(self, split: str, n: int | None, seed: int | None) -> list[dict]:
        rows = list(self.load(split))
        if seed is not None:
            stable_rng(self.name, split, seed).shuffle(rows)
        n = check_count(n, len(rows))
        return [dict(r) for r in rows[:n]]


def get_field(task: str, row: Mapping, key: str):
    if key not in row:
        raise ValueError(f"{task}: data row has no {key!r} column (columns: {sorted(row)})")
    return row[key]
