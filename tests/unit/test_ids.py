import pytest

from csi_driver.ids import InvalidId, NodeId, encode_node_id, join_volume_id, parse_node_id, split_volume_id


def test_node_id_round_trip():
    text = encode_node_id("iqn.2026-11.io.berth.lab:node1", ["198.18.0.11", "198.18.1.11"])
    assert text == "iqn.2026-11.io.berth.lab:node1|198.18.0.11,198.18.1.11"
    assert parse_node_id(text) == NodeId("iqn.2026-11.io.berth.lab:node1", ("198.18.0.11", "198.18.1.11"))
    assert len(text.encode()) < 128


def test_node_id_ipv6_address():
    node = parse_node_id("iqn.2026-11.io.berth.lab:n|fd00::11")
    assert node.addresses == ("fd00::11",)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("fake-node-id-0123456789", "no '|'"),
        ("iqn.2026-11.io.berth.lab:n|", "no addresses"),
        ("nonsense|198.18.0.11", "not an initiator name"),
        ("iqn.2026-11.io.berth.lab:n|198.18.0.11,host.example", "not an IP address"),
    ],
)
def test_node_id_rejects(text, fragment):
    with pytest.raises(InvalidId, match=fragment):
        parse_node_id(text)


def test_encode_node_id_needs_address():
    with pytest.raises(InvalidId, match="at least one address"):
        encode_node_id("iqn.2026-11.io.berth.lab:n", [])


def test_volume_id_round_trip():
    vid = join_volume_id("lab-iscsi", "vol-3f2a9c01d4e5b6a7c8d9")
    assert vid == "lab-iscsi/vol-3f2a9c01d4e5b6a7c8d9"
    assert split_volume_id(vid) == ("lab-iscsi", "vol-3f2a9c01d4e5b6a7c8d9")


@pytest.mark.parametrize("vid", ["fake-vol-id", "/vol-1", "lab/", "lab/vol/extra", "lab/-x", ""])
def test_split_volume_id_rejects(vid):
    with pytest.raises(InvalidId):
        split_volume_id(vid)
