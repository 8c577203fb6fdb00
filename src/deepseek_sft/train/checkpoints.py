"""Resumable checkpoints: find the newest complete one, and never resume a run with different inputs.

models/checkpoints is a `persist: true` DVC output, so it survives between runs. A checkpoint is only reused
when the run fingerprint (see fingerprint.py: params, base weights by content, data, code, ...) is the one
it was written under; `dvc exp run -S train.learning_rate=...` therefore starts fresh instead of silently
continuing another experiment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from ..io import sha256_file, write_json

log = logging.getLogger(__name__)

FINGERPRINT = "run_fingerprint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def fingerprint(parts: dict) -> str:
    """A stable hash of JSON-serialisable run inputs."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def files_digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file (directories: of each *.json / *.safetensors / tokenizer file inside)."""
    out = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[str(f)] = sha256_file(f)
    return out


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last, so a checkpoint without it was interrupted mid-save."""
    return (checkpoint / "trainer_state.json").is_file()


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N directory, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
    ]
    return sorted(found)


def prepare_output_dir(
    output_dir: str | Path, run_fingerprint: str, resume: bool, parts: dict[str, str] | None = None
) -> Path | None:
    """Clean `output_dir` for this run and return the checkpoint to resume from (or None).

    Drops incomplete checkpoints, and all checkpoints if the fingerprint differs or resume is off. `parts`
    ({part: hash}, recorded beside the fingerprint) lets the warning name what changed.
    Call on the main process only (others wait), e.g. inside TrainingArguments.main_process_first().
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = output_dir / FINGERPRINT
    previous = json.loads(stamp.read_text()) if stamp.is_file() else {}
    found = checkpoints(output_dir)
    if found and (previous.get("fingerprint") != run_fingerprint or not resume):
        why = "resume is off" if not resume else f"{changed_parts(previous.get('parts'), parts)} changed"
        log.warning(
            "removing %d old checkpoint(s) in %s: %s; training starts at step 0", len(found), output_dir, why
        )
        for _, path in found:
            shutil.rmtree(path)
        found = []
    for _, path in found:
        if not is_complete(path):
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", path)
            shutil.rmtree(path)
    write_json(stamp, {"fingerprint": run_fingerprint} | ({"parts": parts} if parts else {}))
    return latest_checkpoint(output_dir)


def changed_parts(before: dict[str, str] | None, now: dict[str, str] | None) -> str:
    """Which fingerprint parts differ, as text ("base_weights, data"), or a generic phrase when unknown."""
    if not before or not now:
        return "params, data, base model or code"
    names = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(names) or "the fingerprint"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    complete = [p for _, p in checkpoints(Path(output_dir)) if is_complete(p)]
    return complete[-1] if complete else None


def resumed_step(checkpoint: Path | None) -> int:
    """The global step a checkpoint was written at (0 for None)."""
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
