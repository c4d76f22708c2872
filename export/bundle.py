"""Deployment bundles: a folder with what an engine needs and a manifest that describes it.

`manifest.json` names the bundle's kind, the model and the target it was sized for, the planner's
figures, the commands that build and serve it, and every file with its size and sha256, so that
`nanokit build` can check a bundle before it spends minutes loading it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
FORMAT = "nanokit-bundle"
VERSION = 1


def sha256(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def copy_tokenizer(source: Path, folder: Path) -> None:
    """The checkpoint's tokenizer files (those it has) into `folder`, created here."""
    import shutil

    folder.mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, folder / name)


def write_manifest(folder: Path, kind: str, **fields) -> dict:
    """Hash every file under `folder` and write the manifest beside them."""
    from nano import __version__

    files = {str(p.relative_to(folder)): _entry(p) for p in sorted(folder.rglob("*"))
             if (p.is_file() or p.is_symlink()) and p.name != MANIFEST}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nanokit": __version__,
        "command": " ".join(shlex.quote(a) for a in ["nanokit", *sys.argv[1:]]),
        **fields,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _entry(path: Path) -> dict:
    # A link (to a source checkpoint's weights, which the bundle does not copy) is recorded, not hashed.
    if path.is_symlink():
        return {"link": os.readlink(path)}
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The manifest of the bundle in `folder`; with `verify`, every file's size and sha256 checked."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise ValueError(f"{folder}: no {MANIFEST}; not a bundle written by nanokit export")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                         f"this nanokit reads {FORMAT!r} version {VERSION}")
    if verify:
        for name, entry in manifest["files"].items():
            file = folder / name
            if "link" in entry:
                if not file.exists():
                    raise ValueError(f"{folder}: {name} links to {entry['link']}, which does not exist here "
                                     f"(copy the bundle with its links followed, or set MODEL_DIR)")
                continue
            if not file.exists():
                raise ValueError(f"{folder}: {name} is listed in the manifest but missing")
            if file.stat().st_size != entry["bytes"] or sha256(file) != entry["sha256"]:
                raise ValueError(f"{folder}: {name} differs from the manifest (changed or truncated since export)")
    return manifest
