"""In-memory stand-ins for the storage host, for unit tests of the controller's logic only."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime

from csi_driver.storage import tags as tagcodec
from csi_driver.storage.backend import filesystem_minimum_bytes
from csi_driver.storage.errors import NotFound
from csi_driver.storage.iscsi import IscsiExporter
from csi_driver.storage.lvm import LvInfo, PoolCapacity, PoolView, round_up
from csi_driver.storage.nfs import NfsExporter

MiB = 1 << 20
GiB = 1 << 30


class FakeThinPool:
    def __init__(self, size_bytes: int = 100 * GiB, extent: int = 4 * MiB) -> None:
        self.vg, self.pool = "berth", "pool"
        self.size_bytes = size_bytes
        self.extent = extent
        self.lvs: dict[str, LvInfo] = {}
        self.calls: list[str] = []
        self.reads = 0  # lvs calls a ThinPool would run: find, get, list, view, capacity
        self.snapshot_fails: dict[str, Exception] = {}  # source LV → what snapshotting it raises

    @property
    def key(self) -> tuple[object, ...]:
        return (id(self),)  # every fake pool is a pool of its own

    def extent_size(self) -> int:
        return self.extent

    def round_size(self, size_bytes: int) -> int:
        return round_up(size_bytes, self.extent)

    def _make(self, name: str, size: int, meta: dict[str, str], origin: str = "") -> LvInfo:
        encoded = tuple(tagcodec.encode_tags(meta))
        return LvInfo(
            name=name, vg=self.vg, uuid=name, size_bytes=size, attr="Vwi-a-tz--", tags=encoded,
            meta=tagcodec.decode_tags(encoded), origin=origin, pool=self.pool,
            created=datetime(2026, 11, 26, tzinfo=UTC), data_percent=0.0, metadata_percent=0.0,
        )  # fmt: skip

    def find(self, lv: str) -> LvInfo | None:
        self.reads += 1
        return self.lvs.get(lv)

    def get(self, lv: str) -> LvInfo:
        self.reads += 1
        if lv not in self.lvs:
            raise NotFound(f"logical volume {self.vg}/{lv} not found")
        return self.lvs[lv]

    def list(self, tag_filter=None, managed_only=True) -> list[LvInfo]:
        self.reads += 1
        want = dict(tag_filter or {})
        return [i for i in self.lvs.values() if all(i.meta.get(k) == v for k, v in want.items())]

    def create_volume(self, lv: str, size: int, tags, known_absent: bool = False) -> LvInfo:
        self.calls.append(f"create {lv}")
        self.lvs[lv] = self._make(lv, self.round_size(size), dict(tags))
        return self.lvs[lv]

    def snapshot(self, source: LvInfo, new_lv: str, tags, read_only=False, known_absent=False) -> LvInfo:
        source_lv = source.name
        self.calls.append(f"snapshot {source_lv} {new_lv}")
        if source_lv in self.snapshot_fails:
            raise self.snapshot_fails[source_lv]
        self.lvs[new_lv] = self._make(new_lv, source.size_bytes, dict(tags), origin=source_lv)
        return self.lvs[new_lv]

    def clone(self, source: LvInfo, new_lv: str, size: int, tags, known_absent: bool = False) -> LvInfo:
        info = self.snapshot(source, new_lv, tags)
        if info.size_bytes < size:
            self.resize(new_lv, size)
        return self.lvs[new_lv]

    def resize(self, lv: str, size: int) -> int:
        info = self.get(lv)
        self.lvs[lv] = replace(info, size_bytes=max(info.size_bytes, self.round_size(size)))
        return self.lvs[lv].size_bytes

    def remove(self, lv: str) -> bool:
        self.calls.append(f"remove {lv}")
        return self.lvs.pop(lv, None) is not None

    def update_meta(self, lv: str, changes, current: LvInfo | None = None) -> LvInfo:
        info = self.lvs[lv]  # the fake is always current (the real one reads nothing when given `current`)
        meta = {k: v for k, v in info.meta.items()}
        for key, value in changes.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        encoded = tuple(tagcodec.encode_tags(meta))
        self.lvs[lv] = replace(info, tags=encoded, meta=tagcodec.decode_tags(encoded))
        return self.lvs[lv]

    def rename(self, lv: str, new_name: str) -> None:
        self.calls.append(f"rename {lv} {new_name}")
        self.lvs[new_name] = replace(self.lvs.pop(lv), name=new_name)

    def drop_meta(self, lv: str, current: LvInfo) -> None:
        self.calls.append(f"drop_meta {lv}")
        self.lvs[lv] = replace(self.get(lv), tags=(), meta={})

    def add_foreign(self, name: str, size: int, attr: str = "Vwi-a-tz--", pool: str = "pool") -> LvInfo:
        """An LV Berth did not make (no tags): what `berth adopt` takes over."""
        self.lvs[name] = replace(self._make(name, size, {}), tags=(), meta={}, attr=attr, pool=pool)
        return self.lvs[name]

    def view(self) -> PoolView:
        # capacity() counts the one lvs a view is (subclasses change what capacity() reports)
        return PoolView(self.capacity(), {n: i for n, i in self.lvs.items() if i.pool == self.pool})

    def capacity(self) -> PoolCapacity:
        self.reads += 1
        used = sum(i.size_bytes for i in self.lvs.values()) // 10  # thin: little is written
        return PoolCapacity(self.size_bytes, used, self.size_bytes - used, used * 100 / self.size_bytes, 1.0)


class FakeExporter:
    def __init__(self, protocol: str = "iscsi") -> None:
        self.protocol = protocol
        self.fresh_needs_prepare = True  # a test sets False to take iSCSI's shortcut
        self.mutable_parameters = (IscsiExporter if protocol == "iscsi" else NfsExporter).mutable_parameters
        self.modified: list[tuple[str, dict[str, str]]] = []  # (lv, mutable parameters in its tags) per modify()
        self.acls: dict[str, dict[str, bool]] = {}
        self.prepared: list[str] = []
        self.frozen: list[str] = []
        self.prepare_error: Exception | None = None
        self.grow_calls: list[tuple[str, int]] = []  # (lv, max_bytes) of every grown() call
        self.grow_error: Exception | None = None
        self.prepare_limits: list[int] = []
        self.calls: list[str] = []  # fence/unfence; a test may share its pool's list to see the order
        self.fence_error: Exception | None = None
        self.unfence_error: Exception | None = None

    def volume_context(self, lv: str) -> dict[str, str]:
        return {"wwn": f"wwn-{lv}"} if self.protocol == "iscsi" else {"nfsServer": "198.18.0.1", "nfsExport": lv}

    def minimum_bytes(self, parameters) -> int:
        return filesystem_minimum_bytes(parameters.get("fsType", ""))

    def check_parameters(self, parameters) -> None:
        pass

    def prepare(self, lv: LvInfo, fresh: bool, max_bytes: int) -> None:
        self.prepare_limits.append(max_bytes)
        if self.prepare_error is not None:
            raise self.prepare_error
        self.prepared.append(lv.name)

    def publish(self, lv: LvInfo, node, readonly: bool, secrets) -> dict[str, str]:
        self.acls.setdefault(lv.name, {})[node.initiator] = readonly
        return {"targetIqn": f"iqn.2026-11.io.csi.berth:{lv.name}", "targetPortals": "198.18.0.1:3260"}

    def unpublish(self, lv: LvInfo, node) -> None:
        self.acls.get(lv.name, {}).pop(node.initiator, None)

    def modify(self, lv: LvInfo) -> None:
        self.modified.append((lv.name, tagcodec.meta_to_params(lv.meta, tagcodec.MUTABLE_PREFIX)))

    def fence(self, lvs, token: str, seconds: int) -> None:
        self.calls.append("fence " + " ".join(lv.name for lv in lvs))
        if self.fence_error is not None:
            raise self.fence_error

    def unfence(self, token: str) -> None:
        self.calls.append("unfence")
        if self.unfence_error is not None:
            raise self.unfence_error

    def teardown(self, lv: LvInfo) -> None:
        self.acls.pop(lv.name, None)

    def grown(self, lv: LvInfo, max_bytes: int) -> bool:
        self.grow_calls.append((lv.name, max_bytes))
        if self.grow_error is not None:
            raise self.grow_error
        return self.protocol == "iscsi"

    @contextmanager
    def consistent(self, lv: LvInfo):
        self.frozen.append(lv.name)
        yield
