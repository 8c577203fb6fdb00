"""Content digest of a checkpoint's weights (every *.safetensors file), computed once and recorded beside them.

The base_model stage writes `weights_digest.json` into models/base; the train stage puts the digest into its run
fingerprint, so a checkpoint with the same config, tokenizer and file sizes but other weights never resumes the
old run's checkpoints. Hashing reads every byte (minutes for a 60 GB checkpoint), hence the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DIGEST_FILE = "weights_digest.json"
_CHUNK = 1 << 20  # 1 MB reads: constant memory for any shard size


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The *.safetensors files of `directory`, sorted by name (the order the digest covers them in)."""
    return sorted((p for p in Path(directory).glob("*.safetensors") if p.is_file()), key=lambda p: p.name)


def weights_digest(directory: str | os.PathLike) -> str:
    """Hex sha256 over every *.safetensors file of `directory`: name, size and content, in name order.

    The name and size go in too, so renaming or re-sharding the same bytes gives another digest.
    """
    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights to digest")
    total = hashlib.sha256()
    for path in files:
        total.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                total.update(chunk)
    return total.hexdigest()


def sample_digest(path: Path) -> str:
    """sha256 of a file's first and last MB: a cheap check that a recorded digest still describes the file."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_CHUNK))
        if size > _CHUNK:
            f.seek(max(size - _CHUNK, _CHUNK))
            h.update(f.read(_CHUNK))
    return h.hexdigest()


def digest_record(directory: str | os.PathLike) -> dict:
    """What `weights_digest.json` holds: {"sha256": weights_digest, "files": {name: {"size", "sample_sha256"}}}."""
    return {"sha256": weights_digest(directory), "files": _file_facts(directory)}


def _file_facts(directory: str | os.PathLike) -> dict[str, dict]:
    return {
        p.name: {"size": p.stat().st_size, "sample_sha256": sample_digest(p)} for p in weight_files(directory)
    }


def _matches(files: dict, directory: str | os.PathLike) -> bool:
    """Whether a record's "files" lists the weight files present, with their sizes (and samples, if recorded)."""
    present = _file_facts(directory)
    if set(files) != set(present):
        return False
    for name, value in files.items():
        listed = value if isinstance(value, dict) else {"size": value}
        if any(
            listed.get(key, present[name][key]) != present[name][key] for key in ("size", "sample_sha256")
        ):
            return False
    return True


def recorded_digest(directory: str | os.PathLike) -> str | None:
    """The digest recorded in `directory`/weights_digest.json, or None when it is missing, unreadable or does
    not describe the weight files present now (names, sizes, first and last MB: a record left from other weights)."""
    path = Path(directory) / DIGEST_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        digest, files = record["sha256"], record["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); hashing the weights instead", path, e)
        return None
    if not isinstance(files, dict) or not _matches(files, directory):
        log.warning("%s lists other weight files than %s holds; hashing the weights instead", path, directory)
        return None
    return str(digest)


def base_weights_digest(directory: str | os.PathLike) -> str:
    """The recorded digest when it matches the files present, else computed now (and logged as such)."""
    digest = recorded_digest(directory)
    if digest is None:
        log.info("hashing the weights of %s (no usable %s)", directory, DIGEST_FILE)
        digest = weights_digest(directory)
    return digest
