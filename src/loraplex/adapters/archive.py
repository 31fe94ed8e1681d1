"""Move one adapter version between stores as a tar file: `NAME/vN/{manifest.json, adapter_config.json,
adapter_model.safetensors}`.

Export writes members with fixed metadata (mtime 0, root, 0644), so exporting a version twice
gives the same bytes. Import never lets tar choose a path: it reads the three expected members by
name into a temporary directory inside the store, checks the manifest's schema and every
checksum, and only then renames the directory into place. Importing a version that is already
there with the same checksums does nothing; one with different weights is refused.

This module does not touch aliases: they are deployment state of the store they live in.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraplex import staging
from loraplex.adapters import registry
from loraplex.errors import UserError
from loraplex.paths import check_name

FILES = (registry.MANIFEST, *registry.ADAPTER_FILES)
OPTIONAL = (registry.KNOWLEDGE,)  # carried when the version has it
_MEMBER = re.compile(r"^(?P<name>[^/]+)/v(?P<version>[1-9][0-9]*)/(?P<file>[^/]+)$")
MAX_MEMBER_BYTES = 8 << 30


class FileInfo(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    """The fields import relies on; everything else in a manifest is carried as is."""

    model_config = ConfigDict(extra="allow")
    name: str
    version: int = Field(ge=1)
    files: dict[str, FileInfo]
    base_model: dict[str, Any]


def export_tar(ref: str, out: Path) -> registry.AdapterRef:
    target = registry.resolve(ref)
    registry.verify(target)  # never ship a damaged adapter
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.clear_leftovers(out.parent)
    fd, tmp = staging.new_file(out.parent, "archive", ".tar")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for fname in FILES + tuple(f for f in OPTIONAL if (target.path / f).is_file()):
                path = target.path / fname
                info = tarfile.TarInfo(f"{target.name}/v{target.version}/{fname}")
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                info.uname = info.gname = "root"
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def import_tar(path: Path) -> tuple[registry.AdapterRef, bool]:
    """Import the adapter version in `path`; (ref, False) when that exact version was already there."""
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the `with tar` below
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"{path}: not a readable adapter archive ({e})") from None
    with tar:
        try:
            members = tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise UserError(f"{path}: the archive is damaged or truncated ({e})") from None
        found: dict[str, tarfile.TarInfo] = {}
        names = set()
        for m in members:
            if m.isdir():
                continue
            match = _MEMBER.match(m.name)
            if not match or not m.isfile() or match.group("file") not in FILES + OPTIONAL:
                raise UserError(
                    f"{path}: unexpected member {m.name!r}; an adapter archive holds only NAME/vN/"
                    f"{{{', '.join(FILES)}}} as regular files"
                )
            if m.size > MAX_MEMBER_BYTES:
                raise UserError(f"{path}: member {m.name} is {m.size} bytes, more than an adapter should be")
            names.add((match.group("name"), int(match.group("version"))))
            found[match.group("file")] = m
        if len(names) != 1:
            raise UserError(f"{path}: an archive must hold exactly one adapter version, found {len(names)}")
        ((name, version),) = names
        check_name(name)
        missing = [f for f in FILES if f not in found]
        if missing:
            raise UserError(f"{path}: {', '.join(missing)} missing from the archive")
        manifest_bytes = _read(tar, found[registry.MANIFEST], path)
        try:
            manifest = Manifest.model_validate_json(manifest_bytes)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "manifest"
            raise UserError(f"{path}: manifest.json field {where}: {err['msg']}") from None
        if (manifest.name, manifest.version) != (name, version):
            raise UserError(
                f"{path}: manifest says {manifest.name}@v{manifest.version} but the files are {name}/v{version}"
            )
        if set(manifest.files) - set(OPTIONAL) != set(registry.ADAPTER_FILES) or set(manifest.files) - set(FILES) != {
            f for f in OPTIONAL if f in found
        }:
            raise UserError(
                f"{path}: manifest.json must list checksums for exactly {', '.join(registry.ADAPTER_FILES)} "
                f"(and {', '.join(OPTIONAL)} when the archive holds it)"
            )

        root = registry.store_root() / name
        root.mkdir(parents=True, exist_ok=True)
        registry.sync()  # first repair (and report) what an earlier import that was killed left
        tmp = staging.new_dir(root, "import")
        try:
            (tmp / registry.MANIFEST).write_bytes(manifest_bytes)
            for fname in [f for f in (*registry.ADAPTER_FILES, *OPTIONAL) if f in manifest.files]:
                with open(tmp / fname, "wb") as f:
                    src = tar.extractfile(found[fname])
                    if src is None:
                        raise UserError(f"{path}: {fname} is not a regular file")
                    shutil.copyfileobj(src, f, 1 << 20)
            staged = registry.AdapterRef(name, version, tmp)
            try:
                registry.verify(staged)
            except UserError as e:
                raise UserError(f"{path}: {e}") from None
            return _place(staged, manifest, path)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise UserError(f"{path}: cannot import ({e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise UserError(f"{path}: {member.name} is not a regular file")
    data = f.read(member.size + 1)
    if len(data) != member.size:
        raise UserError(f"{path}: {member.name} is truncated")
    return data


def _place(staged: registry.AdapterRef, manifest: Manifest, path: Path) -> tuple[registry.AdapterRef, bool]:
    final = registry.store_root() / staged.name / f"v{staged.version}"
    with registry.locked():
        if final.exists():
            existing = registry.AdapterRef(staged.name, staged.version, final)
            have = existing.manifest().get("files", {})
            want = {k: v.model_dump() for k, v in manifest.files.items()}
            if {k: v.get("sha256") for k, v in have.items()} != {k: v["sha256"] for k, v in want.items()}:
                raise UserError(
                    f"{path}: {existing.id} already exists with different weights; versions are immutable. "
                    "Import it under another name, or delete the local version first"
                )
            return existing, False
        os.rename(staged.path, final)
        registry.index_version(staged.name, staged.version, manifest.model_dump())
    return registry.AdapterRef(staged.name, staged.version, final), True
