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


@pytest.mark.parametrize(
    "vid",
    [
        "lab/vol-3f2a9c01d4e5b6a7c8d9\n",  # `$` accepted a trailing newline
        "lab\n/vol-1",
        "b" * 100 + "/vol-" + "0" * 30,  # over 128 bytes: Berth never makes such an ID
    ],
)
def test_split_volume_id_rejects_newlines_and_ids_berth_cannot_have_made(vid):
    with pytest.raises(InvalidId):
        split_volume_id(vid)


def test_node_id_rejects_trailing_newline_and_more_than_256_bytes():
    with pytest.raises(InvalidId):
        parse_node_id("iqn.2026-11.io.berth.lab:n\n|198.18.0.11")
    with pytest.raises(InvalidId, match="256"):
        parse_node_id("iqn.2026-11.io.berth.lab:n|" + ",".join(["198.18.0.11"] * 30))


INITIATOR_NAMES = [
    "iqn.2026-11.io.berth.lab:node1",
    "iqn.1993-08.org.debian:01:3f2a9c01d4e5",
    "eui.0123456789ABCDEF",
    "naa.60014050123456789abcdef012345678",
    "iqn.2026-11.io.Berth.lab:node1",  # the node ID accepted upper case, publish refused it
    "iqn.2026-11.io.berth.lab:node#1",
    "iqn.2026-11.io.berth.lab:node1\n",
    "iqn.2026-11.io.berth.lab:" + "x" * 200,
    "naa.0123",
]


@pytest.mark.parametrize("name", INITIATOR_NAMES)
def test_one_initiator_name_rule_for_node_id_controller_and_storage_host(name):
    """A node ID the controller accepts never fails at publish: all three places answer alike."""
    from csi_driver.storage import ids as storage_ids
    from csi_driver.storage import lio_host
    from csi_driver.storage.errors import InvalidRequest

    def accepted(check, *errors):
        try:
            check(name)
            return True
        except errors:
            return False

    in_node_id = accepted(lambda n: parse_node_id(f"{n}|198.18.0.11"), InvalidId)
    assert in_node_id == accepted(storage_ids.check_initiator, InvalidRequest)
    assert in_node_id == accepted(lio_host.check_initiator, lio_host.RequestError)


def test_host_program_keeps_a_verbatim_copy_of_the_initiator_rule():
    from csi_driver import ids
    from csi_driver.storage import lio_host

    assert lio_host._IQN_RE.pattern == ids.IQN_PATTERN
    assert lio_host._EUI_RE.pattern == ids.EUI_PATTERN
    assert lio_host._NAA_RE.pattern == ids.NAA_PATTERN
    assert lio_host.MAX_INITIATOR_NAME_BYTES == ids.MAX_INITIATOR_NAME_BYTES
