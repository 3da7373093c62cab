"""Hostile tar members (a path that climbs out, absolute paths, symbolic and hard links, a fifo, a device) among
good samples: every reader (the training stream, the shard lister behind `index --shards` and the evaluations)
reads the good samples, reads nothing through a link or a device, and writes nothing anywhere."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from support import photo

from dino_scale.data.items import list_shard_items
from dino_scale.data.shards import iter_raw_samples


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    photo(32, 32, seed=seed).save(buffer, format="JPEG")
    return buffer.getvalue()


def hostile_shard(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, payload: bytes | None = None, **fields) -> None:
            info = tarfile.TarInfo(name)
            for key, value in fields.items():
                setattr(info, key, value)
            if payload is None:
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

        add("good0.jpg", jpeg(0))
        add("../../escape1.jpg", jpeg(1))
        add("/tmp/absolute2.jpg", jpeg(2))
        add("link3.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("hard4.jpg", type=tarfile.LNKTYPE, linkname="good0.jpg")
        add("fifo5.jpg", type=tarfile.FIFOTYPE)
        add("device6.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("good7.jpg", jpeg(7))


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_hostile_members_are_read_as_data_or_ignored_and_nothing_is_written(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    hostile_shard(shards / "hostile-000000.tar")
    before = files_under(tmp_path)

    # Regular members are data whatever their names say (a name is a key, never a path); links, the fifo and the
    # device are not samples at all, so nothing is read through them.
    stored = ["good0", "../../escape1", "/tmp/absolute2", "good7"]
    samples = list(iter_raw_samples([str(shards / "hostile-000000.tar")]))
    assert [sample["__key__"] for sample in samples] == stored
    assert [sample["jpg"] for sample in samples] == [jpeg(0), jpeg(1), jpeg(2), jpeg(7)]

    items = list_shard_items(str(shards / "hostile-000000.tar"))
    assert [item.key.split("#", 1)[1] for item in items] == stored
    assert [item.read() for item in items] == [jpeg(0), jpeg(1), jpeg(2), jpeg(7)]
    assert files_under(tmp_path) == before
    assert not Path("/tmp/absolute2.jpg").exists() and not (tmp_path.parent.parent / "escape1.jpg").exists()
