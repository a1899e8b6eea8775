"""A thin pool near full (issue #13, fault 6): new volumes and snapshots are refused at the backend's
full_threshold_percent, GetCapacity offers only what lies below it, and a full pool makes its volumes abnormal."""

from __future__ import annotations

import pytest

from csi_driver.config import ConfigError, parse_config
from csi_driver.storage.backend import LvmBackend
from csi_driver.storage.errors import CapacityExhausted
from csi_driver.storage.lvm import PoolCapacity
from tests.unit.fakes import FakeExporter, FakeThinPool, GiB


class FillablePool(FakeThinPool):
    """A pool whose data use the test sets (percent of its size)."""

    def __init__(self) -> None:
        super().__init__(size_bytes=100 * GiB)
        self.data_percent = 10.0
        self.metadata_percent = 5.0

    def capacity(self) -> PoolCapacity:
        used = int(self.size_bytes * self.data_percent / 100)
        return PoolCapacity(self.size_bytes, used, self.size_bytes - used, self.data_percent, self.metadata_percent)


@pytest.fixture
def pool() -> FillablePool:
    return FillablePool()


@pytest.fixture
def backend(pool: FillablePool) -> LvmBackend:
    return LvmBackend("blk", pool, FakeExporter("iscsi"), over_provisioning_ratio=2.0, full_threshold_percent=90)


def test_below_the_threshold_everything_goes_and_capacity_stops_at_it(pool: FillablePool, backend: LvmBackend):
    volume = backend.create_volume("v", GiB, 0, {}, None)
    backend.create_snapshot("s", volume.lv)
    pool.data_percent = 80.0
    # 10 GiB below 90% of 100 GiB, times the over-provisioning ratio 2
    assert backend.available_bytes() == 20 * GiB
    assert backend.pool_problem() is None


@pytest.mark.parametrize("usage", [{"data_percent": 90.0}, {"metadata_percent": 97.5}])
def test_at_the_threshold_new_volumes_and_snapshots_are_refused(pool: FillablePool, backend: LvmBackend, usage):
    volume = backend.create_volume("v", GiB, 0, {}, None)
    for key, value in usage.items():
        setattr(pool, key, value)
    with pytest.raises(CapacityExhausted, match="at or above backend blk's full_threshold_percent of 90"):
        backend.create_volume("w", GiB, 0, {}, None)
    with pytest.raises(CapacityExhausted, match="no new snapshot"):
        backend.create_snapshot("s", volume.lv)
    assert backend.available_bytes() == 0
    assert backend.create_volume("v", GiB, 0, {}, None) == volume  # a retry of what exists still answers


def test_a_full_pool_is_every_volumes_problem(pool: FillablePool, backend: LvmBackend):
    pool.data_percent = 100.0
    assert "is full (data 100%" in (backend.pool_problem() or "")


@pytest.mark.parametrize("threshold", [0, -5, 100.5])
def test_the_threshold_is_a_percentage(threshold: float):
    config = {"backends": {"b": {"protocol": "nfs", "host": {"address": "local"},
                                 "lvm": {"volume_group": "vg", "thin_pool": "p", "full_threshold_percent": threshold},
                                 "nfs": {"server": "198.18.0.1"}}}}  # fmt: skip
    with pytest.raises(ConfigError, match="full_threshold_percent"):
        parse_config(config)
