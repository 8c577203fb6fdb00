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


def digest_record(directory: str | os.PathLike) -> dict:
    """What `weights_digest.json` holds: {"sha256": weights_digest, "files": {name: size in bytes}}."""
    return {"sha256": weights_digest(directory), "files": _sizes(directory)}


def _sizes(directory: str | os.PathLike) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in weight_files(directory)}


def _listed_sizes(files: dict) -> dict[str, int | None]:
    """{name: size} from a record's "files" (values: a size, or a mapping with "size")."""
    out = {}
    for name, value in files.items():
        out[name] = value.get("size") if isinstance(value, dict) else value
    return out


def recorded_digest(directory: str | os.PathLike) -> str | None:
    """The digest recorded in `directory`/weights_digest.json, or None when it is missing, unreadable or does
    not list exactly the weight files (names and sizes) present now (a record left over from other weights)."""
    path = Path(directory) / DIGEST_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        digest, files = record["sha256"], record["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); hashing the weights instead", path, e)
        return None
    if not isinstance(files, dict) or _listed_sizes(files) != _sizes(directory):
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
