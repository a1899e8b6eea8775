"""Property tests (hypothesis) over the request validators: what they accept is exactly what the rules say, and
hostile input of any shape ends in the validator's own error, never in another exception."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_driver import ids
from csi_driver.csi import csi_pb2
from csi_driver.services.controller import _capacity_range
from csi_driver.services.errors import RpcError
from csi_driver.services.validation import MAX_MAP_BYTES, map_problem, name_problem
from csi_driver.storage import lio_host, nfs_host
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.errors import CapacityExhausted, OutOfRange
from tests.unit.fakes import FakeExporter, FakeThinPool, GiB

BANNED_IN_NAMES = {chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]}
CONTROL = {chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}
# Text that often holds what validators must refuse: control characters, newlines, non-ASCII.
hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=160) | st.text(
    alphabet="ab/|,.:-_\n\r\t\x00\x7f\x85é", max_size=40
)
# The machine running the tests is shared with emulated guests: time per example is no measure here.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=12,
)


@relaxed
@given(hostile_text)
def test_a_name_is_valid_exactly_when_the_spec_says_so(name):
    expected = 0 < len(name.encode()) <= 128 and not set(name) & BANNED_IN_NAMES
    assert (name_problem(name) is None) == expected


@relaxed
@given(st.dictionaries(hostile_text, hostile_text, max_size=40), st.booleans())
def test_a_map_is_valid_exactly_when_the_spec_says_so(mapping, secret):
    expected = all(
        len(k.encode()) <= 128 and len(v.encode()) <= 128 and not set(k + v) & CONTROL for k, v in mapping.items()
    ) and sum(len(k.encode()) + len(v.encode()) for k, v in mapping.items()) <= MAX_MAP_BYTES
    problem = map_problem("secrets", mapping, secret=secret)
    assert (problem is None) == expected
    if problem and secret:
        assert not any(len(v) > 3 and v in problem for v in mapping.values() if set(v) & CONTROL)


part = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9+_.-]{0,60}", fullmatch=True)


@relaxed
@given(part, part)
def test_volume_ids_round_trip(backend, lv):
    volume_id = ids.join_volume_id(backend, lv)
    if len(volume_id.encode()) <= ids.RECOMMENDED_MAX_ID_BYTES:
        assert ids.split_volume_id(volume_id) == (backend, lv)


@relaxed
@given(hostile_text)
def test_an_accepted_volume_id_is_one_berth_could_have_made(text):
    try:
        backend, lv = ids.split_volume_id(text)
    except ids.InvalidId:
        return
    assert ids.join_volume_id(backend, lv) == text and len(text.encode()) <= 128
    assert not set(text) & CONTROL


initiators = st.from_regex(ids.IQN_PATTERN, fullmatch=True).filter(lambda n: len(n) <= 223) | st.from_regex(
    ids.EUI_PATTERN, fullmatch=True
)


@relaxed
@given(initiators, st.lists(st.ip_addresses().map(str), min_size=1, max_size=4))
def test_node_ids_round_trip_and_every_side_accepts_the_initiator(iqn, addresses):
    node_id = ids.encode_node_id(iqn, addresses)
    if len(node_id.encode()) <= ids.MAX_NODE_ID_BYTES:
        assert ids.parse_node_id(node_id) == ids.NodeId(iqn, tuple(addresses))
    lio_host.check_initiator(iqn)  # a node ID the controller accepts never fails at publish


@relaxed
@given(hostile_text)
def test_an_accepted_node_id_re_encodes_to_itself(text):
    try:
        node = ids.parse_node_id(text)
    except ids.InvalidId:
        return
    assert node.encode() == text and "\n" not in text


@relaxed
@given(json_values)
def test_host_programs_refuse_any_malformed_request_with_their_own_error(request):
    for validate, error in ((nfs_host.validate_request, nfs_host.RequestError),
                            (lio_host.validate_request, lio_host.RequestError)):  # fmt: skip
        try:
            validate(request)
        except error:
            pass


@relaxed
@given(
    st.fixed_dictionaries(
        {"v": st.just(1), "op": st.sampled_from(sorted(nfs_host._FIELDS))},
        optional={
            "vg": hostile_text, "lv": hostile_text, "export_root": hostile_text, "options": hostile_text,
            "node_id": hostile_text, "addresses": st.lists(hostile_text, max_size=3), "token": hostile_text,
            "max_bytes": st.integers(), "filesystem": hostile_text, "fresh": st.booleans(),
        },  # fmt: skip
    )
)
def test_nfs_host_never_accepts_a_newline_or_control_character(request):
    try:
        valid = nfs_host.validate_request(request)
    except nfs_host.RequestError:
        return
    for value in valid.values():
        assert not (isinstance(value, str) and set(value) & CONTROL)


@relaxed
@given(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_capacity_range_is_consistent_or_out_of_range(required, limit):
    try:
        got_required, got_limit = _capacity_range(csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit))
    except RpcError as err:
        assert err.code.name == "OUT_OF_RANGE" and limit and required > limit
        return
    assert got_limit == limit and (not limit or got_required <= limit)


@relaxed
@given(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1) | st.just(0), st.integers(1, 2**63 - 1))
def test_no_size_beyond_the_policy_ever_reaches_the_pool(required, limit, expand_to):
    pool = FakeThinPool(size_bytes=100 * GiB)
    backend = LvmBackend("blk", pool, FakeExporter("iscsi"))
    try:
        volume = backend.create_volume("pvc", required, limit, {}, None, default_bytes=GiB)
    except (OutOfRange, CapacityExhausted):
        assert pool.lvs == {}
        return
    assert volume.size_bytes <= backend.size_limit() and volume.size_bytes >= required
    assert not limit or volume.size_bytes <= limit
    try:
        size, _ = backend.expand_volume(volume.lv, expand_to, 0)
    except (OutOfRange, CapacityExhausted):
        assert pool.lvs[volume.lv].size_bytes == volume.size_bytes
        return
    assert size <= backend.size_limit()


@pytest.mark.parametrize("size", [1 << 62, 2**63 - 1])
def test_the_sizes_the_lab_run_sent_are_refused(size):
    backend = LvmBackend("blk", FakeThinPool(), FakeExporter("iscsi"))
    with pytest.raises(OutOfRange):
        backend.create_volume("pvc", size, 0, {}, None)
