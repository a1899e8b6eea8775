import json
from dataclasses import replace

import pytest

from csi_driver.storage import tags
from csi_driver.storage.backend import LvmBackend, by_pool, publications_of
from csi_driver.storage.errors import (
    AlreadyExists,
    Busy,
    CapacityExhausted,
    CommandFailed,
    HostNotReady,
    InUse,
    InvalidRequest,
    NotFound,
    StorageError,
)
from csi_driver.storage.lvm import LvInfo, ThinPool, classify_lvm_error, parse_report, round_up

from ..fakes import FakeExporter
from .fakes import FakeRunner, lv_row, lvs_json, vgs_json

MiB = 1024 * 1024
EXT = 4 * MiB
LV = "vol-0123456789abcdef0123"
NOT_FOUND = f'  Failed to find logical volume "berth/{LV}"\n'

SHELL_METAS = set(";&|`$<>\n")


def pool_with(runner: FakeRunner) -> ThinPool:
    runner.on("vgs", stdout=vgs_json(EXT))
    return ThinPool(runner, "berth", "pool")


def assert_no_shell(runner: FakeRunner) -> None:
    """Every command is a plain argv: no shell wrapper, and LVM is the program."""
    for argv in runner.argvs():
        assert argv[0] in {"lvs", "vgs", "lvcreate", "lvremove", "lvextend", "lvchange"}, argv
        assert argv[0] not in {"sh", "bash"} and "-c" not in argv[:2]


def test_round_up():
    assert round_up(1, EXT) == EXT
    assert round_up(2**63 - 1, EXT) == 2**63, "exact integers: a float would round huge sizes"
    assert round_up(EXT, EXT) == EXT
    assert round_up(EXT + 1, EXT) == 2 * EXT
    for bad in (0, -1):
        with pytest.raises(InvalidRequest):
            round_up(bad, EXT)


def test_extent_size_parsed_and_cached():
    r = FakeRunner()
    pool = pool_with(r)
    assert pool.extent_size() == EXT
    assert pool.extent_size() == EXT
    assert len(r.argvs("vgs")) == 1
    argv = r.argvs("vgs")[0]
    assert argv[-1] == "berth"
    assert ["--reportformat", "json", "--units", "b", "--nosuffix"] == argv[1:6]


def test_create_volume_rounds_up_and_tags():
    r = FakeRunner()
    pool = pool_with(r)
    state = {"created": False}

    def lvs(argv, _):
        if not state["created"]:
            return 5, "", NOT_FOUND
        return 0, lvs_json(lv_row(LV, 3 * EXT, tags.encode_tags({"name": "pvc 1; $(x)"}))), ""

    def lvcreate(argv, _):
        state["created"] = True
        return 0, "", f'  Logical volume "{LV}" created.\n'

    r.on_call("lvs", responder=lvs).on_call("lvcreate", responder=lvcreate)
    info = pool.create_volume(LV, 2 * EXT + 123, {"name": "pvc 1; $(x)"})
    assert info.size_bytes == 3 * EXT
    (argv,) = r.argvs("lvcreate")
    assert argv[argv.index("--virtualsize") + 1] == f"{3 * EXT}b"
    assert argv[argv.index("--thinpool") + 1] == "pool"
    assert argv[argv.index("--name") + 1] == LV
    assert argv[argv.index("--type") + 1] == "thin"
    assert argv[-1] == "berth"
    added = [argv[i + 1] for i, a in enumerate(argv) if a == "--addtag"]
    assert tags.decode_tags(added) == {"name": "pvc 1; $(x)"}
    # The hostile name travels as an escaped tag: no shell metacharacter in any argument.
    assert not any(SHELL_METAS & set(a) for a in argv)
    assert_no_shell(r)


def test_create_volume_idempotent_and_conflict():
    r = FakeRunner()
    pool = pool_with(r)
    meta = {"name": "pvc-1", "kind": "volume"}
    existing = lv_row(LV, 2 * EXT, tags.encode_tags({**meta, "state": "ready"}))
    r.on("lvs", stdout=lvs_json(existing))
    # Same size (after rounding) and metadata: returned as is, state differences ignored.
    info = pool.create_volume(LV, 2 * EXT - 5, {**meta, "state": "creating"})
    assert info.name == LV and info.meta["state"] == "ready"
    assert r.argvs("lvcreate") == []
    with pytest.raises(AlreadyExists):
        pool.create_volume(LV, 3 * EXT, meta)
    with pytest.raises(AlreadyExists):
        pool.create_volume(LV, 2 * EXT, {**meta, "name": "pvc-other"})


@pytest.mark.parametrize(
    "stderr",
    [
        '  Volume group "berth" has insufficient free space (10 extents): 256 required.\n',
        "  Cannot create new thin volume, free space in thin pool berth/pool reached threshold.\n",
        "  Insufficient suitable allocatable extents for logical volume x: 5 more required\n",
    ],
)
def test_lvcreate_capacity_errors(stderr):
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvs", rc=5, stderr=NOT_FOUND).on("lvcreate", rc=5, stderr=stderr)
    with pytest.raises(CapacityExhausted) as exc:
        pool.create_volume(LV, EXT, {"name": "x"})
    assert isinstance(exc.value.__cause__, CommandFailed)
    assert "lvcreate" in str(exc.value)


@pytest.mark.parametrize(
    "stderr", ['  Volume group "berth" not found\n', '  Failed to find logical volume "berth/pool"\n']
)
def test_lvcreate_missing_vg_or_pool_is_the_host_not_a_missing_volume(stderr):
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvs", rc=5, stderr=NOT_FOUND).on("lvcreate", rc=5, stderr=stderr)
    with pytest.raises(HostNotReady, match="lvm.volume_group and lvm.thin_pool"):
        pool.create_volume(LV, EXT, {"name": "x"})


def test_missing_vg_is_never_a_missing_volume():
    """lvs of a volume in a VG that is gone must not read as "volume not found" (find() → None → DeleteVolume
    "succeeds", publish answers NOT_FOUND): it is the host's problem."""
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvs", rc=5, stderr='  Volume group "berth" not found\n  Cannot process volume group berth\n')
    with pytest.raises(HostNotReady):
        pool.find(LV)
    with pytest.raises(HostNotReady, match='Volume group "berth" not found'):
        pool.capacity()
    r.on("lvs", rc=5, stderr='  Failed to find logical volume "berth/pool"\n')
    with pytest.raises(HostNotReady, match="thin pool berth/pool not found"):
        pool.capacity()
    r.on("vgs", stdout=json.dumps({"report": [{"vg": []}]}))
    with pytest.raises(HostNotReady, match="volume group berth not found"):
        ThinPool(r, "berth", "pool").extent_size()


def test_create_race_resolved_by_reading_back():
    r = FakeRunner()
    pool = pool_with(r)
    calls = {"n": 0}

    def lvs(argv, _):
        calls["n"] += 1
        if calls["n"] == 1:
            return 5, "", NOT_FOUND
        return 0, lvs_json(lv_row(LV, EXT, tags.encode_tags({"name": "x"}))), ""

    r.on_call("lvs", responder=lvs)
    r.on("lvcreate", rc=5, stderr=f'  Logical Volume "{LV}" already exists in volume group "berth"\n')
    assert pool.create_volume(LV, EXT, {"name": "x"}).name == LV


def test_get_parses_lvs_json():
    r = FakeRunner()
    pool = pool_with(r)
    row = lv_row(LV, 5 * EXT, tags.encode_tags({"name": "pvc-9", "kind": "volume"}) + ["foreign"])
    row["origin"] = "vol-origin"
    row["data_percent"] = "12.50"
    r.on("lvs", stdout=lvs_json(row))
    info = pool.get(LV)
    assert info.size_bytes == 5 * EXT
    assert info.meta == {"name": "pvc-9", "kind": "volume"}
    assert "foreign" in info.tags and info.managed
    assert info.origin == "vol-origin" and info.pool == "pool"
    assert info.data_percent == 12.5 and info.metadata_percent is None
    assert info.created is not None and info.created.year == 2025 and info.created.utcoffset() is not None
    assert info.active and not info.open and not info.read_only
    assert info.device_path == f"/dev/berth/{LV}"
    argv = r.argvs("lvs")[0]
    assert argv[-1] == f"berth/{LV}"
    assert "lv_tags" in argv[argv.index("-o") + 1]


def test_get_missing_is_not_found_and_find_is_none():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvs", rc=5, stderr=NOT_FOUND)
    with pytest.raises(NotFound):
        pool.get(LV)
    assert pool.find(LV) is None


def test_get_rejects_bad_names_before_running_anything():
    r = FakeRunner()
    pool = pool_with(r)
    for bad in ["a b", "-rf", "x;y", "../x"]:
        with pytest.raises(InvalidRequest):
            pool.get(bad)
    assert r.argvs("lvs") == []


def test_remove_is_idempotent():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvremove", stdout=f'  Logical volume "{LV}" successfully removed.\n')
    assert pool.remove(LV) is True
    argv = r.argvs("lvremove")[0]
    assert argv[-1] == f"berth/{LV}" and "--force" in argv and "--yes" in argv
    r.on("lvremove", rc=5, stderr=NOT_FOUND)
    assert pool.remove(LV) is False
    assert_no_shell(r)


def test_remove_in_use_and_missing_vg():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvremove", rc=5, stderr=f"  Logical volume berth/{LV} in use.\n")
    with pytest.raises(InUse):
        pool.remove(LV)
    r.on("lvremove", rc=5, stderr='  Volume group "berth" not found\n  Cannot process volume group berth\n')
    with pytest.raises(HostNotReady):
        pool.remove(LV)


def test_snapshot_argv():
    r = FakeRunner()
    pool = pool_with(r)
    snap = "snap-0123456789abcdef0123"
    state = {"created": False}

    def lvs(argv, _):
        if not state["created"]:
            return 5, "", NOT_FOUND
        return 0, lvs_json(lv_row(snap, 2 * EXT, tags.encode_tags({"name": "s"}), attr="Vri-a-tz--", origin=LV)), ""

    def lvcreate(argv, _):
        state["created"] = True
        return 0, "", ""

    r.on_call("lvs", responder=lvs).on_call("lvcreate", responder=lvcreate)
    info = pool.snapshot(LvInfo.from_row(lv_row(LV, 2 * EXT)), snap, {"name": "s"}, read_only=True)
    unknown_until_read = {"uuid", "created", "thin_id", "data_percent", "metadata_percent"}
    assert replace(info, **{k: None for k in unknown_until_read}) == replace(  # what lvs would have said
        pool.get(snap), **{k: None for k in unknown_until_read}
    )
    assert r.argvs("lvs") == [r.argvs("lvs")[0]] * 2  # the get above; snapshot itself read back nothing
    assert info.origin == LV and info.read_only and info.size_bytes == 2 * EXT
    (argv,) = r.argvs("lvcreate")
    assert "--snapshot" in argv
    assert argv[argv.index("--setactivationskip") + 1] == "n"
    assert argv[argv.index("--activate") + 1] == "y"
    assert argv[argv.index("--permission") + 1] == "r"
    assert argv[argv.index("--name") + 1] == snap
    assert argv[-1] == f"berth/{LV}"
    # Thin snapshots take no size: they share the pool.
    assert not {"--size", "-L", "--virtualsize", "-V", "--extents"} & set(argv)


def test_snapshot_of_missing_source():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvs", rc=5, stderr=NOT_FOUND).on("lvcreate", rc=5, stderr=NOT_FOUND)
    with pytest.raises(NotFound):
        pool.snapshot(LvInfo.from_row(lv_row(LV)), "snap-x", {"name": "s"})


def test_resize_grows_only():
    r = FakeRunner()
    pool = pool_with(r)
    size = {"v": 4 * EXT}
    r.on_call("lvs", responder=lambda a, i: (0, lvs_json(lv_row(LV, size["v"])), ""))

    def lvextend(argv, _):
        size["v"] = int(argv[argv.index("--size") + 1].rstrip("b"))
        return 0, "", ""

    r.on_call("lvextend", responder=lvextend)
    assert pool.resize(LV, 2 * EXT) == 4 * EXT
    assert pool.resize(LV, 4 * EXT) == 4 * EXT
    assert r.argvs("lvextend") == []
    assert pool.resize(LV, 5 * EXT + 1) == 6 * EXT
    (argv,) = r.argvs("lvextend")
    assert argv == ["lvextend", "--size", f"{6 * EXT}b", f"berth/{LV}"]


def test_capacity_from_data_percent():
    r = FakeRunner()
    pool = pool_with(r)
    row = lv_row("pool", 10 * 1024 * MiB, attr="twi-aotz--", pool="", data_percent="25.00")
    row["metadata_percent"] = "10.71"
    r.on("lvs", stdout=lvs_json(row))
    cap = pool.capacity()
    assert cap.size_bytes == 10 * 1024 * MiB
    assert cap.used_bytes == 10 * 1024 * MiB // 4
    assert cap.free_bytes == cap.size_bytes - cap.used_bytes
    assert cap.metadata_percent == 10.71
    assert r.argvs("lvs")[0][-1] == "berth/pool"


def test_capacity_refuses_non_pool():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvs", stdout=lvs_json(lv_row("pool", attr="-wi-a-----")))
    with pytest.raises(StorageError):
        pool.capacity()


def test_list_selects_pool_and_filters_meta():
    r = FakeRunner()
    pool = pool_with(r)
    rows = [
        lv_row("vol-a", tags=tags.encode_tags({"kind": "volume", "name": "a"})),
        lv_row("snap-b", tags=tags.encode_tags({"kind": "snapshot", "name": "b"})),
        lv_row("manual", tags=["owner=alice"]),
    ]
    r.on("lvs", stdout=lvs_json(*rows))
    assert [i.name for i in pool.list({"kind": "volume"})] == ["vol-a"]
    assert [i.name for i in pool.list()] == ["vol-a", "snap-b"]
    assert [i.name for i in pool.list(managed_only=False)] == ["vol-a", "snap-b", "manual"]
    argv = r.argvs("lvs")[0]
    assert argv[argv.index("--select") + 1] == "pool_lv=pool"
    assert argv[-1] == "berth"


def test_update_meta_adds_and_deletes_tags():
    r = FakeRunner()
    pool = pool_with(r)
    current = tags.encode_tags({"name": "x", "state": "creating", "old": "1"})
    r.on("lvs", stdout=lvs_json(lv_row(LV, tags=current))).on("lvchange")
    pool.update_meta(LV, {"state": "ready", "old": None, "pub.node|1.2.3.4": "rw"})
    (argv,) = r.argvs("lvchange")
    deleted = {argv[i + 1] for i, a in enumerate(argv) if a == "--deltag"}
    added = {argv[i + 1] for i, a in enumerate(argv) if a == "--addtag"}
    assert deleted == {"berth.state=creating", "berth.old=1"}
    assert added == {"berth.state=ready", "berth.pub.node:7C1.2.3.4=rw"}
    assert argv[-1] == f"berth/{LV}"


def test_update_meta_from_the_callers_copy_runs_only_lvchange():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvchange")
    current = LvInfo.from_row(lv_row(LV, tags=(*tags.encode_tags({"name": "x", "state": "creating"}), "foreign")))
    updated = pool.update_meta(LV, {"state": "ready", "pub.n1": "rw"}, current)
    assert r.argvs("lvs") == [] and len(r.argvs("lvchange")) == 1
    assert updated.meta == {"name": "x", "state": "ready", "pub.n1": "rw"}
    assert "foreign" in updated.tags, "tags Berth does not own stay"
    assert (updated.size_bytes, updated.attr) == (current.size_bytes, current.attr)


def test_backends_sharing_a_pool_count_publications_with_one_lvs():
    r = FakeRunner()
    pool = pool_with(r)
    rows = [
        lv_row(f"vol-{backend}", tags=tags.encode_tags({"kind": "volume", "backend": backend, **pub}))
        for backend, pub in [("a", {"pub.n1": "rw"}), ("b", {"pub.n1": "ro"}), ("b", {}), ("other", {"pub.n1": "rw"})]
    ]
    r.on("lvs", stdout=lvs_json(*rows))
    a, b = (LvmBackend(name, pool, FakeExporter()) for name in ("a", "b"))
    elsewhere = LvmBackend("c", ThinPool(FakeRunner(), "berth", "pool"), FakeExporter())
    groups = by_pool([a, elsewhere, b])
    assert groups == [[a, b], [elsewhere]]
    assert publications_of(groups[0], "n1") == 2 and len(r.argvs("lvs")) == 1


def test_update_meta_no_change_runs_nothing():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvs", stdout=lvs_json(lv_row(LV, tags=tags.encode_tags({"state": "ready"}))))
    pool.update_meta(LV, {"state": "ready"})
    assert r.argvs("lvchange") == []


def test_activate_ignores_skip_flag():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvchange")
    pool.activate(LV)
    assert r.argvs("lvchange")[0] == ["lvchange", "--activate", "y", "--ignoreactivationskip", f"berth/{LV}"]


@pytest.mark.parametrize(
    "stderr,cls",
    [
        ('  Failed to find logical volume "berth/x"', NotFound),
        ('  Volume group "nope" not found', HostNotReady),
        ('  Logical Volume "x" already exists in volume group "berth"', AlreadyExists),
        ('  Logical Volume "x" already exists in volume group "berth"', AlreadyExists),
        ("  Logical volume berth/x contains a filesystem in use.", InUse),
        ("  device-mapper: remove ioctl on  (253:5) failed: Device or resource busy", InUse),
        ("  Can't get lock for berth.", Busy),
        ("  Insufficient free space: 1 extents needed, but only 0 available", CapacityExhausted),
        ("  Something else entirely", CommandFailed),
    ],
)
def test_classify_lvm_error(stderr, cls):
    err = CommandFailed(["lvcreate", "x"], 5, stderr)
    mapped = classify_lvm_error(err)
    assert type(mapped) is cls
    assert "exited 5" in str(mapped)  # the human-readable message survives the mapping


def test_parse_report_rejects_garbage():
    with pytest.raises(StorageError):
        parse_report("  WARNING: not json", "lv")
    with pytest.raises(StorageError):
        parse_report(json.dumps({"nope": 1}), "lv")
    assert parse_report(json.dumps({"report": [{"lv": []}]}), "lv") == []


def test_lvinfo_tolerates_json_std_numbers_and_comma_decimals():
    row = lv_row(LV)
    row["lv_size"] = 1073741824  # type: ignore[assignment]  # json_std would print numbers
    row["data_percent"] = "3,25"
    info = LvInfo.from_row(row)
    assert info.size_bytes == 1073741824 and info.data_percent == 3.25


def test_clone_grows_to_requested_size():
    r = FakeRunner()
    pool = pool_with(r)
    new = "vol-ffffffffffffffffffff"
    sizes = {LV: 2 * EXT}

    def lvs(argv, _):
        name = argv[-1].split("/")[1]
        if name not in sizes:
            return 5, "", f'  Failed to find logical volume "{argv[-1]}"'
        return 0, lvs_json(lv_row(name, sizes[name], tags.encode_tags({"name": "c"}))), ""

    def lvcreate(argv, _):
        sizes[new] = sizes[LV]
        return 0, "", ""

    def lvextend(argv, _):
        sizes[new] = int(argv[2].rstrip("b"))
        return 0, "", ""

    r.on_call("lvs", responder=lvs).on_call("lvcreate", responder=lvcreate).on_call("lvextend", responder=lvextend)
    info = pool.clone(LvInfo.from_row(lv_row(LV, 2 * EXT)), new, 3 * EXT, {"name": "c"})
    assert info.size_bytes == 3 * EXT == sizes[new]
    assert [argv[0] for argv in r.argvs()] == ["vgs", "lvs", "lvcreate", "lvextend"]  # no read-backs
    argv = r.argvs("lvcreate")[0]
    assert argv[argv.index("--permission") + 1] == "rw"


def test_adoption_renames_and_drops_only_berths_tags():
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvrename").on("lvchange")
    pool.rename("vm-disk-1", LV)
    current = LvInfo.from_row(lv_row(LV, tags=(*tags.encode_tags({"name": "x"}), "site.owner=ops")))
    pool.drop_meta(LV, current)
    assert r.argvs("lvrename") == [["lvrename", "berth", "vm-disk-1", LV]]
    dropped = ["lvchange", "--deltag", tags.VERSION_TAG, "--deltag", "berth.name=x", f"berth/{LV}"]
    assert r.argvs("lvchange") == [dropped]  # the site's own tag stays
    with pytest.raises(InvalidRequest):
        pool.rename("vm-disk-1", "-rf")


@pytest.mark.parametrize("needs_prepare", [False, True])
def test_create_volume_reads_the_pool_once(needs_prepare: bool):
    """One lvs (the pool and its LVs) stands for the lookup, the capacity and the promised sizes, and a fresh
    volume that needs no preparing (iSCSI) is created ready: no lvchange from creating to ready."""
    r = FakeRunner()
    pool = pool_with(r)
    made: dict[str, str] = {}
    pool_row = lv_row("pool", 10 * 1024 * MiB, attr="twi-aotz--", pool="")

    def lvs(argv, _):
        if "--select" in argv:
            assert argv[argv.index("--select") + 1] == "pool_lv=pool || lv_name=pool"
            return 0, lvs_json(pool_row, *([lv_row(LV, 4 * EXT, made["tags"].split(","))] if made else [])), ""
        return 0, lvs_json(lv_row(LV, 4 * EXT, made["tags"].split(","))), ""  # the new LV, read back

    def lvcreate(argv, _):
        made["tags"] = ",".join(argv[i + 1] for i, a in enumerate(argv) if a == "--addtag")
        return 0, "", ""

    r.on_call("lvs", responder=lvs).on_call("lvcreate", responder=lvcreate).on("lvchange")
    exporter = FakeExporter()
    exporter.fresh_needs_prepare = needs_prepare
    volume = LvmBackend("lab", pool, exporter).create_volume("pvc-1", 4 * EXT, 0, {}, None)
    assert volume.size_bytes == 4 * EXT
    names = [argv[0] for argv in r.argvs()]
    assert names == ["lvs", "vgs", "lvcreate", *(["lvchange"] if needs_prepare else [])], names  # no read-back
    assert len(exporter.prepared) == (1 if needs_prepare else 0)
    state = tags.decode_tags(made["tags"].split(","))["state"]
    assert state == ("creating" if needs_prepare else "ready")


def test_the_pool_view_splits_the_pool_from_its_lvs():
    r = FakeRunner()
    pool = pool_with(r)
    row = lv_row("pool", 10 * 1024 * MiB, attr="twi-aotz--", pool="", data_percent="25.00")
    r.on("lvs", stdout=lvs_json(row, lv_row(LV, 4 * EXT, tags.encode_tags({"kind": "volume"}))))
    view = pool.view()
    assert view.capacity.used_bytes == 10 * 1024 * MiB // 4
    assert list(view.lvs) == [LV] and view.find("pool") is None
    assert [i.name for i in view.list({"kind": "volume"})] == [LV] and view.list({"kind": "snapshot"}) == []
    r.on("lvs", stdout=lvs_json(lv_row(LV, 4 * EXT)))  # the VG is there, the pool is not
    with pytest.raises(HostNotReady):
        pool.view()


def test_thin_ids_are_read_with_every_lv():
    """The thin device id (lvs -o thin_id) names the LV in the pool's metadata (snapshot metadata, thin_delta)."""
    r = FakeRunner()
    pool = pool_with(r)
    r.on("lvs", stdout=lvs_json(lv_row(LV, EXT, thin_id="17")))
    assert pool.get(LV).thin_id == 17
    assert "thin_id" in r.argvs("lvs")[0][r.argvs("lvs")[0].index("-o") + 1].split(",")
    assert LvInfo.from_row(lv_row("pool", attr="twi-aotz--", pool="")).thin_id is None  # not a thin LV


def test_creation_time_reads_as_lvm_prints_it_and_as_the_lvm_shell_reports_it() -> None:
    printed = LvInfo.from_row(lv_row(LV))
    shell = LvInfo.from_row({**lv_row(LV), "lv_time": str(int(printed.created.timestamp()))})  # type: ignore[union-attr]
    assert printed.created is not None and shell.created == printed.created
