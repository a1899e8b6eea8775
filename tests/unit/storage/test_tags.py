import re

import pytest

from csi_driver.storage import tags
from csi_driver.storage.errors import InvalidRequest

# What lvm2 accepts in a tag (lvm(8)): [A-Za-z0-9_+.-/=!:&#], at most 1024 chars, no leading '-'.
LVM_TAG_RE = re.compile(r"^[A-Za-z0-9_+.\-/=!:&#]{1,1024}$")


def assert_valid_lvm_tags(encoded):
    for t in encoded:
        assert LVM_TAG_RE.match(t), t
        assert not t.startswith("-")


@pytest.mark.parametrize(
    "meta",
    [
        {"name": "pvc-3f1c9a2e-7d4b-4c1e-9f0a-123456789abc"},
        {"name": "ünïcödé 名前 🚀", "kind": "volume"},
        {"name": "a b;c$(rm -rf /)`x`\n'\"\\", "state": "creating"},
        {"p.csi.storage.k8s.io/fstype": "xfs", "p.a=b": "c=d", "p.#hash": "x#y", "p.::": ":::"},
        {"empty": ""},
        {"name": "n" * 128, "p.long": "x" * 3000},
        {"name": "é" * 900},  # escapes make this ~5400 chars: several chunks
        {"pub.iqn.2026-11.io.berth.lab:node1|198.18.0.11,198.18.1.11": "ro"},
    ],
)
def test_round_trip(meta):
    encoded = tags.encode_tags(meta)
    assert_valid_lvm_tags(encoded)
    assert tags.VERSION_TAG in encoded
    assert tags.decode_tags(encoded) == meta


def test_short_values_stay_readable():
    assert "berth.name=pvc-1234" in tags.encode_tags({"name": "pvc-1234"})
    assert "berth.p.fs:2Ftype=xfs" in tags.encode_tags({"p.fs/type": "xfs"})


def test_long_values_are_chunked_in_order():
    encoded = tags.encode_tags({"long": "ab:" * 1000})
    chunks = [t for t in encoded if t.startswith("berth.long#")]
    assert len(chunks) > 1
    assert [int(t.split("#")[1].split("=")[0]) for t in chunks] == list(range(len(chunks)))
    # Order of tags as LVM reports them is alphabetical, not ours: decode must not care.
    assert tags.decode_tags(sorted(encoded, reverse=True)) == {"long": "ab:" * 1000}


def test_chunk_boundaries_inside_escapes_decode():
    for n in range(990, 1010):
        value = "x" * n + "é" * 50
        assert tags.decode_tags(tags.encode_tags({"k": value})) == {"k": value}


def test_incomplete_chunk_set_reads_as_missing():
    encoded = tags.encode_tags({"long": "y" * 3000, "name": "n"})
    damaged = [t for t in encoded if not t.startswith("berth.long#1=")]
    assert tags.decode_tags(damaged) == {"name": "n"}


def test_foreign_and_malformed_tags_ignored():
    decoded = tags.decode_tags(["owner=alice", "berth.bad=:ZZ", "berth.ok=1", "berthX=1", "berth.v=1"])
    assert decoded == {"ok": "1"}


def test_rejects_bad_metadata():
    with pytest.raises(InvalidRequest):
        tags.encode_tags({"": "x"})
    with pytest.raises(InvalidRequest):
        tags.encode_tags({"v": "2"})
    with pytest.raises(InvalidRequest):
        tags.encode_tags({"k": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidRequest):
        tags.encode_tags({f"p.{i}": "x" * 500 for i in range(40)})  # over MAX_META_CHARS


def test_escape_alphabet():
    assert tags.escape("a-b_c.d") == "a-b_c.d"
    assert tags.escape(":") == ":3A"
    assert tags.escape("=#") == ":3D:23"
    assert tags.unescape(tags.escape("€")) == "€"
    with pytest.raises(ValueError):
        tags.unescape("a b")


def test_params_helpers():
    meta = tags.params_to_meta({"fsType": "ext4", "a/b": "c"})
    assert meta == {"p.fsType": "ext4", "p.a/b": "c"}
    assert tags.meta_to_params({**meta, "name": "x"}) == {"fsType": "ext4", "a/b": "c"}


def test_tags_for_key_finds_plain_and_chunks():
    encoded = tags.encode_tags({"long": "z" * 2000, "longer": "q"})
    found = tags.tags_for_key(encoded, "long")
    assert found and all(t.startswith("berth.long#") for t in found)
