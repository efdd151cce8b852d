"""`fast_llm_supernet.toolkit.store`: the evaluations JSONL file (one `PlacementQuality` per line), appended to
and read back; a run that is interrupted resumes by skipping what the file already holds."""

from __future__ import annotations

import json
from pathlib import Path

from fast_llm_supernet.toolkit.evaluate import PlacementQuality


def read_evaluations(path: Path, data: str | None = None, checkpoint: str | None = None) -> list[PlacementQuality]:
    """Every record of the file (none if it does not exist), optionally only those on `data` / `checkpoint`.
    A truncated last line (a run killed mid-write) is ignored."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = PlacementQuality.model_validate(json.loads(line))
        except (json.JSONDecodeError, ValueError) as error:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not an evaluation record ({error})") from error
        if (data is None or record.data == data) and (checkpoint is None or record.checkpoint == checkpoint):
            records.append(record)
    return records


def append_evaluations(path: Path, records: list[PlacementQuality]) -> None:
    """Append records, one per line. A partial last line left by a killed run is dropped first: appended after it,
    it would become a corrupt line in the middle of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        text = path.read_bytes()
        if text and not text.endswith(b"\n"):
            with path.open("r+b") as handle:
                handle.truncate(text.rfind(b"\n") + 1)
    with path.open("a") as handle:
        for record in records:
            handle.write(record.model_dump_json() + "\n")
        handle.flush()
