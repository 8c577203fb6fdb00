"""Source `hf`: a dataset loaded with the `datasets` library (a hub id or a local dataset directory).

- a `save_to_disk` folder (state.json / dataset_dict.json) -> datasets.load_from_disk;
- any other local path (a folder of CSV/JSON/Parquet files, or one file) and hub ids ->
  datasets.load_dataset(path, name, split=split, revision=revision).
A list of splits (split: [train, test]) keeps the dataset's own split on each record (records.py).
Hub ids must pin `revision` (a commit sha or tag): an unpinned hub dataset can change under the same
params and break reproducibility. Columns map onto record fields as for local files (tables.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import ParamsError, StageParams
from ..config.data import HfParams
from ..io import DataError
from ..records import canonical_split
from .tables import check_columns, rows_to_records, with_split

VERSION = "hf-1"
SECTION = "fetch.hf"
log = logging.getLogger(__name__)


def fetch_records(params: StageParams) -> list[dict]:
    """Load `fetch.hf.path` (split `fetch.hf.split`, or each split of a list) and map its rows onto raw records.

    With a list of splits each record carries its split (records.py), canonical name (validation -> val).
    """
    cfg: HfParams = params.section.hf
    if isinstance(cfg.split, str):
        return split_records(cfg, cfg.split, params)
    if not cfg.split:
        raise ParamsError(f"{SECTION}.split: an empty list; name at least one split")
    return [
        with_split(r, canonical_split(name)) for name in cfg.split for r in split_records(cfg, name, params)
    ]


def split_records(cfg: HfParams, split: str, params: StageParams) -> list[dict]:
    """Raw records of one split of the dataset."""
    dataset = load(cfg, split)
    where = f"{cfg.path} (split {split})"
    check_columns(list(dataset.column_names), cfg, where, SECTION)
    origin = {"dataset": cfg.path, "split": split}
    if cfg.revision:
        origin["revision"] = cfg.revision
    rows = enumerate(dataset, start=1)
    prefix = f"{Path(cfg.path).name or 'hf'}-{split}"
    return rows_to_records(rows, cfg, params.tasks, source="hf", origin=origin, id_prefix=prefix)


def is_local(path: str) -> bool:
    """Whether `path` names something on disk (else it is taken as a hub id)."""
    return Path(path).expanduser().exists()


def load(cfg: HfParams, split: str):
    """Split `split` of the dataset as a datasets.Dataset."""
    import datasets  # imported here: the other sources never need it

    path = cfg.path
    if not is_local(path):
        if path.startswith((".", "/", "~")) or "\\" in path:
            raise DataError(f"{path}: not found ({SECTION}.path looks like a local path)")
        if not cfg.revision:
            raise ParamsError(
                f"{SECTION}.path={path!r} is a hub dataset id: set {SECTION}.revision to a commit sha or tag "
                "so that the data cannot change under the same params"
            )
    local = Path(path).expanduser()
    if (local / "state.json").exists() or (local / "dataset_dict.json").exists():
        return _from_disk(datasets, local, split)
    kwargs = {"split": split, "revision": cfg.revision}
    if cfg.trust_remote_code:
        # datasets >= 4 no longer runs dataset scripts and only logs an error for this flag
        log.warning("%s.trust_remote_code=true is passed on; datasets >= 4 ignores it", SECTION)
        kwargs["trust_remote_code"] = True
    try:
        return datasets.load_dataset(path, cfg.name, **kwargs)
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as e:  # unknown split, bad files, offline
        raise DataError(f"{path}: datasets.load_dataset failed: {e}") from e


def _from_disk(datasets, path: Path, split: str):
    """A split of a save_to_disk folder (a Dataset folder is taken as the requested split)."""
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r} ({SECTION}.split); splits present: {', '.join(loaded)}"
            )
        return loaded[split]
    return loaded
