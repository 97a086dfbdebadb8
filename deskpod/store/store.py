"""The model store: content-addressed blobs plus one JSON manifest per `name:tag`.

    $DESKPOD_HOME/
      blobs/sha256/<hex>              file contents, read-only, stored once however many models share them
      manifests/<name>/<tag>.json     what a model is and which blobs hold its files
      snapshots/<manifest digest>/    the model as a folder: its files as symlinks to blobs
      tmp/<work dir>/                 scratch for pulls in progress; each locked by its owner
      locks/<name>.lock, locks/.store.lock

Every write is staged in tmp/, fsynced, and renamed into place, the manifest last: a pull killed at
any moment leaves no manifest, and the next pull removes its scratch files. Locks are flock(2), so
the kernel releases them when a process dies: a per-name lock serialises pulls and removes of one
model; the store lock is shared while blobs and manifests are added and exclusive while garbage
(unreferenced blobs, snapshots, dead scratch folders) is collected.
"""

from __future__ import annotations

import builtins
import difflib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from deskpod.config import deskpod_home
from deskpod.errors import CorruptModel, ModelNotFound, UnsupportedModel
from deskpod.store.atomic import flocked, fsync_dir, sha256_file, write_atomic
from deskpod.store.catalog import CATALOG, PullProgress
from deskpod.store.manifest import Manifest
from deskpod.store.names import format_ref, parse_name

if TYPE_CHECKING:
    from deskpod.formats.meta import ModelMeta
    from deskpod.store.pull import Staged


class Store:
    """Pull, list, verify and remove models under one home folder (default $DESKPOD_HOME)."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else deskpod_home()
        self.blobs = self.home / "blobs" / "sha256"
        self.manifests = self.home / "manifests"
        self.snapshots = self.home / "snapshots"
        self.tmp = self.home / "tmp"
        self.locks = self.home / "locks"

    # --- public API ------------------------------------------------------------------------------

    def pull(self, source: str, name: str | None = None, progress: PullProgress = True, origin: str | None = None,
             check: Callable[[ModelMeta], None] | None = None) -> Manifest:
        """Store a catalog model or a local .gguf / .onnx / Hugging Face folder under `name` (or its own name).

        Returns at once when the model is already stored from the same source and its blobs are intact.
        `origin` replaces the source the manifest records (a model made in a scratch folder names what made it).
        `check(meta)` may refuse the model by its metadata before anything is stored. `progress`: bars on the
        terminal (True), nothing (False), or a callable told (what, bytes done, bytes in all or None).
        """
        from deskpod.store.pull import resolve_source  # imports formats, which may import the store

        src = resolve_source(source)
        model, tag = parse_name(name or src.default_ref)
        with flocked(self._name_lock(model)):
            current = self._load_or_none(model, tag)
            if current and src.is_fresh(current) and self._blobs_present(current):
                return current
            created = datetime.now(timezone.utc).isoformat()  # before staging: later edits to a source show
            with self._workdir() as work:
                staged = src.stage(work / "stage", progress, check)
                manifest = _manifest(model, tag, staged, origin or src.description, created)
                with self._store_lock(shared=True):
                    self._commit(manifest, [s.path for s in staged.files], work)
            if current and current.digest != manifest.digest:
                with self._store_lock(shared=False):
                    self._collect_garbage()
        return manifest

    def list(self) -> list[Manifest]:
        """Every readable manifest, sorted by ref; unreadable ones are reported by verify()."""
        manifests = []
        for path in self._manifest_paths():
            try:
                manifests.append(self._load(path))
            except CorruptModel:
                continue
        return manifests

    def get(self, name: str) -> Manifest:
        model, tag = parse_name(name)
        path = self._manifest_path(model, tag)
        if not path.is_file():
            raise self._not_found(format_ref(model, tag))
        return self._load(path)

    def has(self, name: str) -> bool:
        model, tag = parse_name(name)
        return self._manifest_path(model, tag).is_file()

    def ensure(self, name: str, progress: bool = True) -> Manifest:
        """get(), pulling first when `name` is a catalog model that is not stored yet."""
        from deskpod.store.pull import catalog_key

        try:
            return self.get(name)
        except ModelNotFound:
            if catalog_key(name) is None:
                raise
            return self.pull(name, progress=progress)

    def remove(self, name: str) -> None:
        """Delete the manifest, then every blob and snapshot that no manifest references any more."""
        model, tag = parse_name(name)
        with flocked(self._name_lock(model)):
            path = self._manifest_path(model, tag)
            if not path.is_file():
                raise self._not_found(format_ref(model, tag))
            with self._store_lock(shared=False):
                path.unlink()
                fsync_dir(path.parent)
                if not any(path.parent.iterdir()):
                    path.parent.rmdir()
                self._collect_garbage()

    def verify(self, name: str | None = None) -> builtins.list[str]:
        """Re-hash every blob of one model (or all); one human-readable line per problem, [] when all good."""
        if name is not None:
            return self._check(self.get(name), functools.cache(self._blob_problem))
        problems = []
        check = functools.cache(self._blob_problem)  # blobs shared between models are hashed once
        for path in self._manifest_paths():
            try:
                problems += self._check(self._load(path), check)
            except CorruptModel as e:
                problems.append(str(e))
        return problems

    def model_dir(self, model: str | Manifest) -> Path:
        """The model as a folder: its files under their original names, as symlinks to the blobs."""
        manifest = self._resolve(model)
        snapshot = self.snapshots / manifest.digest
        if snapshot.is_dir():
            return snapshot
        self._require_blobs(manifest)
        with self._workdir() as work:
            build = work / "snapshot"
            for f in manifest.files:
                link = build / f.name
                link.parent.mkdir(parents=True, exist_ok=True)
                target = os.path.relpath(self.blob_path(f.sha256), (snapshot / f.name).parent)
                os.symlink(target, link)
            with self._store_lock(shared=True):
                self.snapshots.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(build, snapshot)
                except OSError:
                    if not snapshot.is_dir():  # else another process built the same snapshot first
                        raise
                fsync_dir(self.snapshots)
        return snapshot

    def model_file(self, model: str | Manifest) -> Path:
        """The blob holding the primary file of a single-file model (the .gguf or .onnx)."""
        manifest = self._resolve(model)
        if manifest.primary is None:
            raise UnsupportedModel(
                f"{manifest.ref} is a {manifest.format} folder model with no single model file; use model_dir()"
            )
        self._require_blobs(manifest)
        return self.blob_path(manifest.primary.sha256)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    # --- manifests -------------------------------------------------------------------------------

    def _manifest_path(self, model: str, tag: str) -> Path:
        return self.manifests / model / f"{tag}.json"

    def _manifest_paths(self) -> builtins.list[Path]:
        return sorted(self.manifests.glob("*/*.json"))

    def _load(self, path: Path) -> Manifest:
        try:
            manifest = Manifest.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, CorruptModel) as e:
            raise CorruptModel(f"manifest {path} is unreadable ({e}); pull the model again or remove it") from e
        if path != self._manifest_path(manifest.name, manifest.tag):
            raise CorruptModel(f"manifest {path} describes {manifest.ref}, which belongs elsewhere")
        return manifest

    def _load_or_none(self, model: str, tag: str) -> Manifest | None:
        try:
            return self._load(self._manifest_path(model, tag))
        except CorruptModel:
            return None  # missing or unreadable: a pull writes it afresh

    def _resolve(self, model: str | Manifest) -> Manifest:
        return model if isinstance(model, Manifest) else self.get(model)

    def _not_found(self, ref: str) -> ModelNotFound:
        stored = [m.ref for m in self.list()]
        close = difflib.get_close_matches(ref, stored + list(CATALOG), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        return ModelNotFound(
            f"model {ref!r} is not in the store ({self.home}). "
            f"Stored: {', '.join(stored) or 'none'}. "
            f"Catalog (deskpod pull NAME): {', '.join(CATALOG)}.{hint}"
        )

    # --- writing -----------------------------------------------------------------------------------

    def _commit(self, manifest: Manifest, staged: builtins.list[Path], work: Path) -> None:
        """Move staged files into blobs/ (same content, same name: replacing is harmless), then write the manifest."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        for f, path in zip(manifest.files, staged, strict=True):
            path.chmod(0o444)  # a snapshot symlink must not become a way to edit a shared blob
            os.replace(path, self.blob_path(f.sha256))
        fsync_dir(self.blobs)
        target = self._manifest_path(manifest.name, manifest.tag)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, json.dumps(manifest.to_dict(), indent=2).encode(), work)
        fsync_dir(self.manifests)

    @contextmanager
    def _workdir(self) -> Iterator[Path]:
        """A private scratch folder in tmp/, locked while in use; dead processes' folders are removed first."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        with self._store_lock(shared=False):
            self._clean_tmp()
        with ExitStack() as stack:
            with self._store_lock(shared=True):  # create and lock it where _clean_tmp cannot see it half-made
                work = Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"{os.getpid()}-"))
                stack.enter_context(flocked(work / ".lock"))
            try:
                yield work
            finally:
                shutil.rmtree(work, ignore_errors=True)

    def _clean_tmp(self) -> None:
        """Remove scratch folders whose owner is gone (its lock is free). Caller holds the store lock."""
        for entry in self.tmp.iterdir():
            if not entry.is_dir():
                entry.unlink(missing_ok=True)
                continue
            with flocked(entry / ".lock", blocking=False) as free:
                if free:
                    shutil.rmtree(entry, ignore_errors=True)

    def _collect_garbage(self) -> None:
        """Delete blobs and snapshots that no manifest references. Caller holds the store lock exclusively."""
        try:
            manifests = [self._load(p) for p in self._manifest_paths()]
        except CorruptModel:
            return  # an unreadable manifest may reference any blob; keep everything (verify reports it)
        blobs = {f.sha256 for m in manifests for f in m.files}
        snapshots = {m.digest for m in manifests}
        for blob in self.blobs.glob("*"):
            if blob.name not in blobs:
                blob.unlink()
        for snapshot in self.snapshots.glob("*"):
            if snapshot.name not in snapshots:
                shutil.rmtree(snapshot)
        self._clean_tmp()

    # --- locks and checks ----------------------------------------------------------------------------

    def _name_lock(self, model: str) -> Path:
        return self.locks / f"{model}.lock"

    def _store_lock(self, shared: bool) -> AbstractContextManager[bool]:
        return flocked(self.locks / ".store.lock", shared=shared)

    def _blobs_present(self, manifest: Manifest) -> bool:
        """The quick check: every blob exists with the right size (verify() re-hashes)."""
        return all(self._blob_problem(f.sha256, f.size, hash_it=False) is None for f in manifest.files)

    def _require_blobs(self, manifest: Manifest) -> None:
        problems = [p for f in manifest.files if (p := self._blob_problem(f.sha256, f.size, hash_it=False))]
        if problems:
            raise CorruptModel(f"{manifest.ref}: {problems[0]}; run `deskpod pull` for it again")

    def _check(self, manifest: Manifest, check: Callable[[str, int], str | None]) -> builtins.list[str]:
        return [f"{manifest.ref}: {f.name}: {problem}" for f in manifest.files if (problem := check(f.sha256, f.size))]

    def _blob_problem(self, sha256: str, size: int, hash_it: bool = True) -> str | None:
        blob = self.blob_path(sha256)
        if not blob.is_file():
            return f"blob {blob} is missing"
        if (actual := blob.stat().st_size) != size:
            return f"blob {blob} is corrupt: {actual} bytes, expected {size}"
        if hash_it and (digest := sha256_file(blob)) != sha256:
            return f"blob {blob} is corrupt: its sha256 is {digest}"
        return None


def _manifest(model: str, tag: str, staged: Staged, source: str, created: str) -> Manifest:
    files = tuple(s.file for s in staged.files)
    meta = staged.meta
    return Manifest(
        name=model,
        tag=tag,
        format=meta.format,
        architecture=meta.architecture,
        parameters=meta.parameters,
        quantization=meta.quantization,
        context_length=meta.context_length,
        size=sum(f.size for f in files),
        files=files,
        source=source,
        created=created,
    )
