"""Launch the train stage with DeepSpeed's launcher so that several runs can share one host.

    python -m deepseek_sft.train.launch --num_gpus 2 scripts/train.py --base models/base ...

Everything before the script goes to `deepspeed` as given. Before it runs, this:
- picks the rendezvous port: `train.master_port` from params, else a free one (deepspeed's default 29500 made a
  second checkout or a parallel experiment fail with EADDRINUSE). DeepSpeed names its CPU all-reduce buffers
  in /dev/shm after the port, so a port of its own also keeps each run's buffers apart;
- removes DeepSpeed all-reduce buffers of this user that no process maps any more (a killed run cannot unlink
  its own; a new run that found one under its name could read a dead run's data);
- removes a torch-extension build lock that no build holds any more (a build killed mid-way leaves `lock`
  behind, and every later run waits on it silently forever); one that may still be held is reported with the
  command that deletes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from ..config import load_section
from .setup import _free_port

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"
SHM_GRACE_SECONDS = 60  # a buffer is created, then mapped: younger ones may be between the two
LOCK_STALE_SECONDS = 300  # torch's build baton: older than this with no build working in the directory


def master_port(params_port: int | None) -> int:
    """The rendezvous port: the one params name, else a free one on this host."""
    return params_port if params_port is not None else _free_port()


def _proc_entries():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield entry


def mapped_shm_files() -> set[str]:
    """Paths under /dev/shm that a process we can inspect has mapped (/proc/<pid>/maps)."""
    mapped = set()
    for proc in _proc_entries():
        try:
            text = (proc / "maps").read_text()
        except OSError:
            continue  # gone, or another user's process
        mapped.update(line.split(None, 5)[-1] for line in text.splitlines() if f" {SHM_DIR}/" in line)
    return {m.removesuffix(" (deleted)") for m in mapped}


def stale_shm_buffers(now: float | None = None) -> list[Path]:
    """This user's DeepSpeed all-reduce buffers that no process maps and that are older than the grace time."""
    now = time.time() if now is None else now
    mapped = mapped_shm_files()
    ours = SHM_DIR.glob(f"{SHM_PREFIX}{os.getuid()}_*")
    return sorted(p for p in ours if str(p) not in mapped and now - p.stat().st_mtime > SHM_GRACE_SECONDS)


def remove_stale_shm_buffers() -> list[Path]:
    """Unlink `stale_shm_buffers` (each logged); return them."""
    removed = []
    for path in stale_shm_buffers():
        size_mb = path.stat().st_size / 2**20
        path.unlink(missing_ok=True)
        log.warning(
            "removed %s (%.0f MB): a DeepSpeed all-reduce buffer no process maps (killed run)", path, size_mb
        )
        removed.append(path)
    return removed


def processes_using(directory: Path) -> list[int]:
    """Pids whose working directory or an open file lies inside `directory` (ninja builds run there)."""
    directory = directory.resolve()
    pids = []
    for proc in _proc_entries():
        try:
            links = [proc / "cwd", *(proc / "fd").iterdir()]
            targets = [Path(os.readlink(link)) for link in links]
        except OSError:
            continue
        if any(t == directory or directory in t.parents for t in targets):
            pids.append(int(proc.name))
    return pids


def extension_locks(extensions_dir: Path) -> list[Path]:
    """torch.utils.cpp_extension build batons (`<extension>/lock`) under `extensions_dir`."""
    return sorted(extensions_dir.glob("**/lock")) if extensions_dir.is_dir() else []


def clear_stale_extension_locks(
    extensions_dir: Path, now: float | None = None
) -> tuple[list[Path], list[Path]]:
    """Remove build locks nothing works on and older than LOCK_STALE_SECONDS; return (removed, left).

    torch's FileBaton holds no descriptor and records no pid, so a live build is recognised by the processes
    working in the extension's directory (the build's ninja and compilers run there).
    """
    now = time.time() if now is None else now
    removed, left = [], []
    for lock in extension_locks(extensions_dir):
        age = now - lock.stat().st_mtime
        users = processes_using(lock.parent)
        if age > LOCK_STALE_SECONDS and not users:
            lock.unlink(missing_ok=True)
            log.warning(
                "removed %s: a build lock %.0f min old with no build running (a killed run's)", lock, age / 60
            )
            removed.append(lock)
        else:
            why = f"processes {users} work in {lock.parent}" if users else f"only {age:.0f} s old"
            log.warning(
                "%s exists (%s): a build of this op is running or was killed; DeepSpeed waits until it is gone. "
                "If no build is running, delete it: rm %s",
                lock,
                why,
                lock,
            )
            left.append(lock)
    return removed, left


def deepspeed_command(argv: list[str], port: int) -> list[str]:
    """`deepspeed <launcher args> --master_port PORT <script> <script args>` (a given --master_port is kept)."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    script_at = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
    if script_at is None:
        raise SystemExit("usage: python -m deepseek_sft.train.launch [deepspeed options] SCRIPT.py [args]")
    before, after = argv[:script_at], argv[script_at:]
    if any(a == "--master_port" or a.startswith("--master_port=") for a in before):
        return [launcher, *before, *after]
    return [launcher, *before, "--master_port", str(port), *after]


def main(argv: list[str] | None = None) -> None:
    """Prepare the host (port, stale buffers and locks) and exec the DeepSpeed launcher."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    params = load_section("train").section
    remove_stale_shm_buffers()
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR")
    if extensions:
        clear_stale_extension_locks(Path(extensions))
    command = deepspeed_command(argv, master_port(params.master_port))
    log.info("launching: %s", " ".join(command))
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
