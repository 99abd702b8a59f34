"""One record per run: a flat JSON object, written atomically; many records -> a DataFrame."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from methods.common.atomic import write_json_atomic

RECORD_NAME = "record.json"

# Every record has these keys; a figure the device cannot measure is null, never 0.
REQUIRED_FIELDS = (
    "method", "subject", "seed", "status", "error", "run_key", "model", "eval",
    "clip_t", "clip_i", "dino", "dino_inter", "n_images",
    "train_steps", "train_seconds", "it_per_s", "generation_seconds",
    "artifact_bytes", "trainable_params",
    "peak_allocated_bytes", "peak_reserved_bytes",
    "peak_allocated_with_load_bytes", "peak_reserved_with_load_bytes",
)  # fmt: skip

STATUSES = ("ok", "failed", "diverged", "oom")


class CorruptRecord(ValueError):
    """A record file that does not parse or lacks required fields; the message names its path and
    says what to do."""

    def __init__(self, path: Path, why: str):
        super().__init__(
            f"corrupt record {path}: {why}; delete it (the run is redone) or move it away to keep it"
        )
        self.path = path


def new_record(**fields: Any) -> dict[str, Any]:
    record = dict.fromkeys(REQUIRED_FIELDS)
    record.update(fields)
    return record


def write_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"record lacks fields {missing}")
    if record["status"] not in STATUSES:
        raise ValueError(f"record status {record['status']!r} not in {STATUSES}")
    path = Path(run_dir) / RECORD_NAME
    write_json_atomic(path, record)
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptRecord(path, str(e)) from e
    if not isinstance(record, dict):
        raise CorruptRecord(path, f"a JSON {type(record).__name__}, not an object")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise CorruptRecord(path, f"missing fields {missing}")
    if record["status"] not in STATUSES:
        raise CorruptRecord(path, f"status {record['status']!r} not in {STATUSES}")
    return record


def load_records(results_dir: str | Path, corrupt: list[CorruptRecord] | None = None):
    """All records under <results_dir>/runs as one DataFrame (one row per run, path column added).
    A corrupt record raises CorruptRecord; with a ``corrupt`` list, it is appended there instead."""
    import pandas as pd

    rows = []
    for path in sorted(Path(results_dir).glob(f"runs/**/{RECORD_NAME}")):
        try:
            record = read_record(path)
        except CorruptRecord as e:
            if corrupt is None:
                raise
            corrupt.append(e)
            continue
        record["path"] = str(path.parent)
        rows.append(record)
    return pd.DataFrame(rows, columns=None if rows else [*REQUIRED_FIELDS, "path"])
