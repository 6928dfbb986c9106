"""Read an ImageFolder split from an archive or a directory, decoding every image once.

Decoding 60,000 JPEGs costs seconds, so the decoded uint8 arrays are cached as .npy files under the
cache directory, keyed by the source's path, size and modification time; any change re-decodes.
Files are written to a temporary name and renamed, and meta.json goes last, so an interrupted or
concurrent run never leaves a half-written cache that looks valid.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netslim.errors import NetslimError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
_CACHE_FORMAT = 1
_PARALLEL_MIN = 2000  # below this many images a worker pool costs more than it saves


def default_cache_dir() -> Path:
    return Path(os.environ.get("NETSLIM_CACHE") or Path.home() / ".cache" / "netslim")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class DecodedSplit:
    """images: uint8 N x 3 x H x W; labels: int64 indices into `classes` (all classes of the source)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


# ---------------------------------------------------------------- listing
def _parts(rel: str) -> list[str]:
    return [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]


def _locate(rel: str) -> tuple[str, str, str] | None:
    """(root, split folder, class) for an image path like [top/]split/class/.../file.jpg, else None."""
    parts = _parts(rel)
    ok = len(parts) >= 3 and parts[-1].lower().endswith(IMAGE_SUFFIXES) and not parts[-1].startswith(".")
    return _class_dir(parts[:-1]) if ok else None


def _class_dir(parts: list[str]) -> tuple[str, str, str] | None:
    """(root, split folder, class) of a directory path like [top/]split/class[/...], else None."""
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    for i in (0, 1):
        if len(parts) >= i + 2 and parts[i] in ("train", "test", "val"):
            return "/".join(parts[:i]), parts[i], parts[i + 1]
    return None


class _Listing:
    """Collects the image files of a source and picks the requested split's files; class folders are recorded
    too, so that one without images is an error rather than a class that vanishes (shifting later labels)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.found: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (root, split dir) -> [(class, name)]
        self.class_dirs: set[tuple[str, str, str]] = set()

    def add_dir(self, rel: str) -> None:
        if (where := _class_dir(_parts(rel))) is not None:
            self.class_dirs.add(where)

    def add(self, rel: str) -> bool:
        self.add_dir("/".join(_parts(rel)[:-1]))  # its folder, even when it is not an image
        where = _locate(rel)  # (root, split dir, class)
        if where is not None:
            self.found.setdefault(where[:2], []).append((where[2], rel))
        return where is not None

    def resolve(self, split: str) -> tuple[list[str], list[tuple[int, str]]]:
        """All class names (sorted), and (label, member name) of the split's images in class, name order."""
        roots = sorted({root for root, _ in self.found})
        if not roots:
            raise NetslimError(f"{self.source} has no images in train/<class>/ or test|val/<class>/ folders "
                               "(optionally under one top-level folder)")
        if len(roots) > 1:
            shown = ", ".join(repr(r or ".") for r in roots)
            raise NetslimError(f"{self.source} holds several dataset roots ({shown}); keep exactly one")
        root = roots[0]
        dirs = [d for d in SPLIT_DIRS[split] if (root, d) in self.found]
        if not dirs:
            wanted = " or ".join(f"{d}/" for d in SPLIT_DIRS[split])
            raise NetslimError(f"{self.source} has no {split} split: no images under {wanted}")
        present = {cls for cls, _ in self.found[(root, dirs[0])]}
        empty = sorted("/".join(p for p in (r, d, c) if p) for r, d, c in self.class_dirs
                       if (r, d) == (root, dirs[0]) and c not in present)
        if empty:
            raise NetslimError(f"{self.source}: class folder {', '.join(empty)} has no images (add some or remove it)")
        classes = sorted({cls for key, files in self.found.items() for cls, _ in files})
        index = {c: i for i, c in enumerate(classes)}
        files = sorted(self.found[(root, dirs[0])])
        return classes, [(index[cls], name) for cls, name in files]


# ---------------------------------------------------------------- decoding
def _decode_chunk(chunk: list[tuple[str, bytes]]) -> tuple[np.ndarray | None, str]:
    """Decode to RGB uint8 H x W x 3; returns (stack, first name) or (None, error message)."""
    from PIL import Image

    arrays: list[np.ndarray] = []
    for name, blob in chunk:
        try:
            with Image.open(io.BytesIO(blob)) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as exc:  # PIL raises many types for bad data
            return None, f"cannot decode image {name}: {exc}"
        if arrays and arr.shape != arrays[0].shape:
            return None, _size_message(chunk[0][0], arrays[0].shape, name, arr.shape)
        arrays.append(arr)
    return np.stack(arrays), chunk[0][0]


def _size_message(name_a: str, shape_a: tuple, name_b: str, shape_b: tuple) -> str:
    return (f"all images must have one size: {name_a} is {shape_a[1]}x{shape_a[0]} but {name_b} is "
            f"{shape_b[1]}x{shape_b[0]} (resize the dataset first)")


def _workers(n: int) -> int:
    env = os.environ.get("NETSLIM_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    if n < _PARALLEL_MIN or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def decode_images(items: list[tuple[str, bytes]]) -> np.ndarray:
    """N x H x W x 3 uint8 from encoded images; all must share one size. Uses two processes for big sets."""
    workers = _workers(len(items))
    if workers == 1:
        results = [_decode_chunk(items)]
    else:
        size = -(-len(items) // (workers * 4))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        # fork: the workers only run PIL/numpy code, and need not re-import the caller's modules
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_decode_chunk, chunks)
    for arr, message in results:
        if arr is None:
            raise NetslimError(message)
    first_arr, first_name = results[0]
    for arr, name in results[1:]:
        if arr.shape[1:] != first_arr.shape[1:]:
            raise NetslimError(_size_message(first_name, first_arr.shape[1:], name, arr.shape[1:]))
    return np.concatenate([a for a, _ in results]) if len(results) > 1 else first_arr


# ---------------------------------------------------------------- sources
def _read_archive(path: Path, split: str) -> tuple[list[str], list[int], list[tuple[str, bytes]]]:
    listing = _Listing(path)
    blobs: dict[str, bytes] = {}
    wanted = SPLIT_DIRS[split]
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        listing.add_dir(info.filename)
                    elif listing.add(info.filename):
                        if _locate(info.filename)[1] in wanted:  # type: ignore[index]
                            blobs[info.filename] = zf.read(info)
        else:
            with tarfile.open(path, "r|*") as tf:
                for member in tf:
                    if member.isdir():
                        listing.add_dir(member.name)
                    elif member.isfile() and listing.add(member.name):
                        if _locate(member.name)[1] in wanted:  # type: ignore[index]
                            blobs[member.name] = tf.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise NetslimError(f"cannot read archive {path}: {reason} (corrupt or truncated?)") from exc
    classes, files = listing.resolve(split)
    return classes, [label for label, _ in files], [(name, blobs[name]) for _, name in files]


def _walk_folder(path: Path) -> _Listing:
    listing = _Listing(path)
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, path)
        listing.add_dir(rel_dir)
        for fn in filenames:
            listing.add(fn if rel_dir == "." else f"{rel_dir}/{fn}")
    return listing


def _read_folder(path: Path, split: str) -> tuple[list[str], list[int], list[tuple[str, bytes]]]:
    classes, files = _walk_folder(path).resolve(split)
    items = []
    for _, name in files:
        try:
            items.append((name, (path / name).read_bytes()))
        except OSError as exc:
            raise NetslimError(f"cannot read {path / name}: {exc}") from exc
    return classes, [label for label, _ in files], items


def _source_key(path: Path) -> str:
    """Changes whenever the archive (or any file of the folder) changes size or modification time."""
    h = hashlib.sha256(f"v{_CACHE_FORMAT}|{path.resolve()}".encode())
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            h.update(f"|{dirpath}/".encode())  # an added (even empty) folder changes the data
            for fn in sorted(filenames):
                st = os.stat(os.path.join(dirpath, fn))
                h.update(f"|{dirpath}/{fn}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        st = path.stat()
        h.update(f"|{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def cache_location(path: Path, cache_dir: Path | None = None) -> Path:
    """The folder holding the decoded arrays of `path` (archive or ImageFolder directory)."""
    stem = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return (cache_dir or default_cache_dir()) / "images" / f"{stem}-{_source_key(path)}"


# ---------------------------------------------------------------- cache files
def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_cached(folder: Path, split: str) -> DecodedSplit | None:
    meta_path = folder / f"{split}.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(folder / f"{split}_images.npy")
        labels = np.load(folder / f"{split}_labels.npy")
    except (OSError, ValueError):
        return None
    if meta.get("format") != _CACHE_FORMAT or not len(images) == len(labels) == meta.get("count"):
        return None
    return DecodedSplit(images, labels, list(meta["classes"]))


def _store(folder: Path, split: str, data: DecodedSplit, source: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / f"{split}_images.npy", lambda f: np.save(f, data.images))
        _atomic_write(folder / f"{split}_labels.npy", lambda f: np.save(f, data.labels))
        meta = {"format": _CACHE_FORMAT, "source": str(source.resolve()), "count": len(data.labels),
                "classes": data.classes}
        _atomic_write(folder / f"{split}.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError:
        pass  # an unwritable cache only costs speed


def load_image_folder(path: Path, split: str, cache_dir: Path | None = None) -> DecodedSplit:
    """Decoded `split` ("train" or "test", the latter read from test/ or val/) of an archive or directory."""
    if not path.exists():
        raise NetslimError(f"dataset {path} does not exist")
    folder = cache_location(path, cache_dir)
    cached = _load_cached(folder, split)
    if cached is not None:
        return cached
    reader = _read_folder if path.is_dir() else _read_archive
    classes, labels, items = reader(path, split)
    rgb = decode_images(items)
    chw = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))
    data = DecodedSplit(chw, np.asarray(labels, dtype=np.int64), classes)
    _store(folder, split, data, path)
    return data
