"""Walking image folders: one walker for sharding, indexing, evaluation and training, so they all see the same files.

Training straight from a folder (``data.train_images``) reuses the shard machinery of dino_scale.data.loaders
unchanged, with its exact resume and its handling of unreadable samples. :func:`survey_image_folder` lists the
folder's image files once (no file is opened), puts them in a fixed pseudo-random order and cuts that order into
groups of about :data:`FILES_PER_GROUP` files, "virtual shards", each named by a URL of the form::

    imagefolder:<absolute folder path>#<first>-<last>of<total>

``<first>``..``<last>`` (inclusive) are positions in the fixed order of the folder's ``<total>`` image files, e.g.
``imagefolder:/data/photos#64-127of5000``. The ``imagefolder:`` prefix and the absence of ``://`` keep these URLs from
passing for a local tar path or a remote URL. ``dino_scale.data.shards.iter_raw_samples`` yields one raw sample per
file of such a group: ``{"__key__": <path relative to the folder, with its extension>, "__url__": url, <lower-case
extension>: LazyFile}``. The file is read only when the loader decodes the sample (``sample_image_bytes``), so that
resuming at batch n skips the earlier samples without reading their files, and a reader that keeps only every k-th
sample (fewer groups than readers) reads only those. A file that vanished or cannot be read then is an unreadable
sample, dropped and counted like one whose bytes do not decode.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dino_scale.data.decode import IMAGE_EXTENSIONS
from dino_scale.errors import InputError, NotFound

if TYPE_CHECKING:  # shards imports this module (list_files); ShardSurvey is imported where it is built
    from dino_scale.data.shards import ShardSurvey

log = logging.getLogger(__name__)

FOLDER_URL_PREFIX = "imagefolder:"
# Files per virtual shard. The loader splits shards over ranks x data workers, and with fewer shards than readers
# every reader walks every shard (correct, but each walks all of it): small groups let one folder feed many readers,
# e.g. 5,000 files make 78 groups. A group costs no more than its URL string (there is no file to open per group), so
# the lower bound is the URL list each reader sorts and shuffles every epoch: 10^6 files give 15,625 URLs, as many as
# the shards of a large WebDataset. Small groups also mix better: a shuffle buffer of 1,000 samples spans ~16 groups.
FILES_PER_GROUP = 64
# The sorted listing is permuted with this fixed seed before it is cut into groups: an ImageFolder tree lists class
# by class, and class-sorted groups would give every data worker a class or two at a time (as write_shards avoids).
_ORDER_SEED = 0
_GROUP_FRAGMENT = re.compile(r"(\d+)-(\d+)of(\d+)")
# Resolved folder -> relative paths of its image files in group order. Filled by the survey, so DataLoader workers
# (forked after it) inherit it; a process that has not surveyed the folder (a spawned worker) lists it again.
_LISTINGS: dict[str, tuple[str, ...]] = {}


def list_files(directory: Path) -> list[Path]:
    """All non-hidden files under ``directory`` (hidden folders skipped), sorted by relative path, so that the
    order is the same on every filesystem."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def is_image_file(path: Path) -> bool:
    """Whether a file's suffix is one of the image extensions a shard sample may carry."""
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------------------------------------
# Training from a folder: virtual shards
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LazyFile:
    """The image member of a folder sample: the file, read when the loader decodes the sample."""

    path: str

    def read(self) -> bytes:
        """The file's bytes. Raises InputError naming the file when it is gone or cannot be read (an unreadable
        sample, which the training loader drops and counts)."""
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as error:
            raise InputError(f"cannot read image file {self.path}: {error.strerror or error}") from None


def is_folder_url(url: str) -> bool:
    """Whether ``url`` names a group of an image folder (see the module docstring), not a shard."""
    return url.startswith(FOLDER_URL_PREFIX)


def folder_group_url(root: str, first: int, last: int, total: int) -> str:
    """The URL of files ``first``..``last`` (inclusive) of the ``total`` image files of the folder ``root``."""
    return f"{FOLDER_URL_PREFIX}{root}#{first}-{last}of{total}"


def parse_folder_url(url: str) -> tuple[str, int, int, int]:
    """(folder, first, last, total) of a folder group URL; InputError naming it if it is not of that form."""
    root, _, fragment = url.removeprefix(FOLDER_URL_PREFIX).rpartition("#")
    match = _GROUP_FRAGMENT.fullmatch(fragment)
    if not is_folder_url(url) or not root or match is None:
        raise InputError(f"{url!r} is not an image folder group ({FOLDER_URL_PREFIX}<folder>#<first>-<last>of<total>)")
    first, last, total = (int(n) for n in match.groups())
    if not first <= last < total:
        raise InputError(f"{url!r}: need first <= last < total")
    return root, first, last, total


def _list_images(root: Path) -> tuple[tuple[str, ...], list[Path]]:
    """(relative paths of the image files under ``root`` in group order, the other files)."""
    images: list[str] = []
    others: list[Path] = []
    for path in list_files(root):
        if is_image_file(path):
            images.append(path.relative_to(root).as_posix())
        else:
            others.append(path)
    # list_files sorts, so every rank and process derives the same permutation from the same files.
    random.Random(_ORDER_SEED).shuffle(images)
    return tuple(images), others


def _group_bounds(total: int) -> list[tuple[int, int]]:
    """(first, last) of each group: ceil(total / FILES_PER_GROUP) groups whose sizes differ by at most one, so that
    no reader's share is much shorter than another's (a short share repeats samples within the epoch)."""
    n_groups = -(-total // FILES_PER_GROUP)
    cuts = [i * total // n_groups for i in range(n_groups + 1)]
    return [(cuts[i], cuts[i + 1] - 1) for i in range(n_groups)]


def _suffix_summary(paths: list[Path], limit: int = 4) -> str:
    """How many files of each kind, most common first: "3 .txt, 1 .tar"."""
    counts = Counter(p.suffix.lower() or "(no suffix)" for p in paths)
    more = ", ..." if len(counts) > limit else ""
    return ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common(limit)) + more


def survey_image_folder(root: str) -> ShardSurvey:
    """The image files under ``root`` as virtual shards for the training loader: their group URLs (see the module
    docstring), the number of image files, and no skipped shards.

    Files are listed recursively (hidden files and folders skipped) and sorted by relative path, so every rank sees
    the same listing; an ImageFolder class tree works as it is (labels are not used). Files whose suffix is not an
    image extension are ignored, with a log line saying how many; no file is opened, so a folder of millions of
    files costs one directory walk. The listing is kept for this process's readers (see ``_LISTINGS``).

    Raises:
        NotFound: naming ``root``, when it does not exist, holds no files, or holds no image files (with a hint to
            use data.train_shards when it holds *.tar shards).
        InputError: naming ``root``, when it is a file or cannot be listed.
    """
    from dino_scale.data.shards import ShardSurvey

    path = Path(root).expanduser()
    if not path.exists():
        raise NotFound(f"image folder {root!r} does not exist")
    if not path.is_dir():
        hint = ": a shard? Train on shards with data.train_shards" if path.suffix.lower() == ".tar" else ""
        raise InputError(f"image folder {root!r} is a file, not a folder{hint}")
    try:
        os.scandir(path).close()  # os.walk skips a folder it cannot read without a word
    except OSError as error:
        raise InputError(f"cannot list image folder {root!r}: {error.strerror or error}") from None
    resolved = str(path.resolve())
    images, others = _list_images(Path(resolved))
    if not images:
        if not others:
            raise NotFound(f"image folder {root!r} holds no files")
        tars = sum(p.suffix.lower() == ".tar" for p in others)
        hint = f"; its {tars} *.tar files are shards: train on them with data.train_shards={root}" if tars else ""
        raise NotFound(
            f"no image files (.{', .'.join(IMAGE_EXTENSIONS)}) in {root!r}, only {_suffix_summary(others)}{hint}"
        )
    _LISTINGS[resolved] = images
    bounds = _group_bounds(len(images))
    log.info(
        "image folder %s: %d image files in %d groups of about %d%s",
        resolved,
        len(images),
        len(bounds),
        FILES_PER_GROUP,
        f"; {len(others)} other files ignored ({_suffix_summary(others)})" if others else "",
    )
    urls = [folder_group_url(resolved, first, last, len(images)) for first, last in bounds]
    return ShardSurvey(urls=urls, samples=len(images), skipped=[])


def iter_folder_samples(url: str, on_damage: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
    """The raw samples of one folder group URL, in order: ``{"__key__": relative path, "__url__": url, ext:
    LazyFile}`` (``ext`` the file's lower-case extension), without opening any file.

    The folder's listing is the one this process's survey made (or, in a process that has not surveyed it, a fresh
    one). When that listing no longer holds the group's files (a fresh listing of a folder that changed in between),
    ``on_damage(url, reason)`` is called and nothing is yielded: a reader must never take other files than the group
    named on every other rank.
    """
    root, first, last, total = parse_folder_url(url)
    images = _LISTINGS.get(root)
    if images is None:
        images = _LISTINGS[root] = _list_images(Path(root))[0]
    if len(images) != total:
        on_damage(url, f"the folder now holds {len(images)} image files, not the {total} surveyed (changed?)")
        return
    for rel in images[first : last + 1]:
        ext = rel.rpartition(".")[2].lower()
        yield {"__key__": rel, "__url__": url, ext: LazyFile(os.path.join(root, rel))}
