"""Atomic file output: a reader never sees a half-written results file or edit folder."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    Files already in ``path`` that the block does not write are kept (copied over first).
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        if os.path.isdir(path):
            shutil.copytree(path, tmp, dirs_exist_ok=True)
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: str, data) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# Checkpoints of a sequential edit: one folder per finished batch, the newest named by latest.json.
LATEST = "latest.json"
PROGRESS = "progress.json"


def run_fingerprint(config: dict, requests: list) -> str:
    """sha256 of a run's config and requests (JSON, sorted keys): a checkpoint resumes only its own run."""
    import hashlib

    text = json.dumps({"config": config, "requests": requests}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(handle, directory: str, batch: int, state: dict, run_id: str) -> str:
    """Write the edit after finished batch ``batch`` (``handle.save`` + ``progress.json`` with ``state``
    and ``run_id`` + the torch RNG state) as ``directory/batch-NNNNN``, then point ``latest.json`` at it;
    each step is atomic, so a run killed at any moment leaves the previous checkpoint whole. Refuses
    non-finite weights (the last good checkpoint stays). Returns the checkpoint's folder."""
    import torch
    from safetensors.torch import save_file

    for name, p in handle.bypass.bypass_parameters().items():
        if not bool(torch.isfinite(p.detach()).all()):
            raise ValueError(f"checkpoint after batch {batch}: {name} has non-finite values; "
                             "the last good checkpoint is kept")
    name = f"batch-{batch:05d}"
    path = os.path.join(directory, name)
    handle.save(path, extra={"checkpoint": {"batch": batch, "run_id": run_id}})
    with atomic_dir(path) as tmp:  # keeps the files handle.save wrote
        atomic_write_json(os.path.join(tmp, PROGRESS), {"batch": batch, "run_id": run_id, "state": state})
        save_file({"cpu": torch.get_rng_state()}, os.path.join(tmp, "rng.safetensors"))
    previous = read_latest(directory)
    atomic_write_json(os.path.join(directory, LATEST), {"batch": batch, "path": name, "run_id": run_id})
    if previous and previous["path"] != name:
        shutil.rmtree(os.path.join(directory, previous["path"]), ignore_errors=True)
    return path


def read_latest(directory: str) -> dict | None:
    """``latest.json`` of a checkpoint folder, or None when there is no checkpoint yet."""
    path = os.path.join(directory, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        latest = json.load(f)
    if not os.path.isdir(os.path.join(directory, latest.get("path", ""))):
        raise ValueError(f"{path}: names checkpoint {latest.get('path')!r}, which is missing")
    return latest


def load_checkpoint(handle, directory: str, run_id: str) -> dict | None:
    """Restore the newest checkpoint into ``handle`` (weights, subjects, RNG state); returns
    ``{"batch": ..., "state": ...}`` or None when there is none. A checkpoint of another run (other
    requests or config) or of another backbone is refused with a message saying so."""
    import torch
    from safetensors.torch import load_file

    latest = read_latest(directory)
    if latest is None:
        return None
    path = os.path.join(directory, latest["path"])
    with open(os.path.join(path, PROGRESS), encoding="utf-8") as f:
        progress = json.load(f)
    if progress.get("run_id") != run_id:
        raise ValueError(f"{path}: a checkpoint of another run (other requests or config); resume with the same "
                         "data and options, or start over in a new output folder")
    handle.load_weights(path)
    torch.set_rng_state(load_file(os.path.join(path, "rng.safetensors"))["cpu"])
    return {"batch": progress["batch"], "state": progress["state"]}
