"""checkpoint_digest: content digest of *.safetensors, its record in weights_digest.json and when it is trusted."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save_file

from deepseek_sft.checkpoint_digest import (
    DIGEST_FILE,
    base_weights_digest,
    digest_record,
    recorded_digest,
    weights_digest,
)


def write_weights(directory, seed: int, names=("model-00001.safetensors", "model-00002.safetensors")) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        save_file({"w": torch.randn(700, 1000, generator=gen)}, directory / name)  # 2.8 MB: 3 chunks


def test_digest_covers_content_names_and_order(tmp_path):
    write_weights(tmp_path / "a", seed=0)
    write_weights(tmp_path / "b", seed=1)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "b").iterdir()}
    assert sizes == {
        p.name: p.stat().st_size for p in (tmp_path / "a").iterdir()
    }  # same sizes, other weights
    assert weights_digest(tmp_path / "a") != weights_digest(tmp_path / "b")
    expected = hashlib.sha256()
    for p in sorted((tmp_path / "a").glob("*.safetensors")):
        expected.update(f"{p.name}\0{p.stat().st_size}\0".encode() + p.read_bytes())
    assert weights_digest(tmp_path / "a") == expected.hexdigest()
    (tmp_path / "a" / "config.json").write_text("{}")  # other files are not weights
    assert weights_digest(tmp_path / "a") == expected.hexdigest()


def test_a_record_is_used_only_while_it_describes_the_files(tmp_path):
    write_weights(tmp_path / "a", seed=0)
    record = digest_record(tmp_path / "a")
    assert record["sha256"] == weights_digest(tmp_path / "a")
    assert set(record["files"]) == {"model-00001.safetensors", "model-00002.safetensors"}
    assert recorded_digest(tmp_path / "a") is None  # nothing recorded yet
    (tmp_path / "a" / DIGEST_FILE).write_text(json.dumps(record | {"sha256": "f" * 64}))
    assert base_weights_digest(tmp_path / "a") == "f" * 64  # trusted, not re-hashed
    write_weights(tmp_path / "a", seed=1)  # other weights of the same sizes under the old record
    assert recorded_digest(tmp_path / "a") is None
    assert base_weights_digest(tmp_path / "a") == weights_digest(tmp_path / "a")
    (tmp_path / "a" / DIGEST_FILE).write_text(
        json.dumps({"sha256": "e" * 64, "files": {"model.safetensors": 9}})
    )
    assert recorded_digest(tmp_path / "a") is None  # another file list
    (tmp_path / "a" / DIGEST_FILE).write_text("{not json")
    assert base_weights_digest(tmp_path / "a") == weights_digest(tmp_path / "a")
