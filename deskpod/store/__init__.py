"""The model store: content-addressed blobs and manifests under $DESKPOD_HOME, and where models come from."""

from deskpod.store.catalog import CATALOG, CatalogEntry, DownloadFailed, WheelPath
from deskpod.store.manifest import Manifest, ManifestFile
from deskpod.store.names import parse_name, sanitize_name
from deskpod.store.store import Store

__all__ = [
    "CATALOG",
    "CatalogEntry",
    "DownloadFailed",
    "Manifest",
    "ManifestFile",
    "Store",
    "WheelPath",
    "parse_name",
    "sanitize_name",
]
