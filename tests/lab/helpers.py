"""Storage steps the lab tests compose: thin LVs, LIO exports (rtslib_fb), iSCSI logins, O_DIRECT I/O.

These drive the stack directly (not through Berth) to prove the lab works.
"""

from __future__ import annotations

import time

from lab import Lab
from lab.config import IQN_PREFIX, SUBNETS

PORTALS = [f"{net}.1" for net in SUBNETS]


def target_iqn(name: str) -> str:
    # rtslib wants a dot in the naming authority: "iqn.2026-11.io.berth.lab:..." is fine.
    return f"{IQN_PREFIX}:storage.{name.replace('_', '-')}"


def thin_lv(lab: Lab, name: str, size: str = "256M") -> str:
    lab.run("storage", f"lvcreate -q -T berth/pool -V {size} -n {name}")
    return f"/dev/berth/{name}"


def remove_lv(lab: Lab, *names: str) -> None:
    for name in names:
        lab.run("storage", f"lvremove -q -y berth/{name}", check=False)


def export_lun(lab: Lab, name: str, dev: str, initiators: list[str]) -> str:
    """Export block device `dev` as LUN 0 of a new target on both portals, for the given guests' IQNs."""
    iqn = target_iqn(name)
    acls = [f"{IQN_PREFIX}:{n}" for n in initiators]
    # One python3 + rtslib_fb: 0.5 s, where each targetcli call costs 1-2 s under TCG.
    lab.python(
        "storage",
        f"""
import rtslib_fb as r
r.RTSRoot()
so = r.BlockStorageObject({name!r}, dev={dev!r})
tpg = r.TPG(r.Target(r.FabricModule("iscsi"), {iqn!r}), 1)
tpg.set_attribute("authentication", "0")
for ip in {PORTALS!r}:
    r.NetworkPortal(tpg, ip, 3260)
lun = r.LUN(tpg, 0, so)
for acl in {acls!r}:
    r.MappedLUN(r.NodeACL(tpg, acl), 0, lun)
tpg.enable = True
""",
    )
    return iqn


def unexport_lun(lab: Lab, name: str) -> None:
    lab.python(
        "storage",
        f"""
import rtslib_fb as r
root = r.RTSRoot()
for t in root.targets:
    if t.wwn == {target_iqn(name)!r}:
        t.delete()
for so in root.storage_objects:
    if so.name == {name!r}:
        so.delete()
""",
        check=False,
    )


def sessions_on_target(lab: Lab, name: str) -> dict[str, int]:
    """Initiator IQN -> number of logged-in connections, as the storage guest's LIO sees them."""
    out = lab.python(
        "storage",
        f"""
import rtslib_fb as r
for t in r.RTSRoot().targets:
    if t.wwn == {target_iqn(name)!r}:
        for tpg in t.tpgs:
            for acl in tpg.node_acls:
                s = acl.session
                print(acl.node_wwn, len(s["connections"]) if s and s["state"] == "LOGGED_IN" else 0)
""",
    ).stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line.strip()}


def login(lab: Lab, node: str, iqn: str, portal: str = PORTALS[0]) -> str:
    """Discover + log in through `portal`; returns the /dev/disk/by-path link of LUN 0."""
    lab.run(
        node,
        f"iscsiadm -m discovery -t st -p {portal} >/dev/null && "
        f"iscsiadm -m node -T {iqn} -p {portal}:3260 --login >/dev/null",
    )
    return wait_path(lab, node, f"/dev/disk/by-path/ip-{portal}:3260-iscsi-{iqn}-lun-0")


def logout(lab: Lab, node: str, iqn: str) -> None:
    lab.run(node, f"iscsiadm -m node -T {iqn} --logout; iscsiadm -m node -T {iqn} -o delete", check=False)


def wait_path(lab: Lab, node: str, path: str, timeout: float = 30) -> str:
    lab.run(
        node,
        f"for i in $(seq {int(timeout * 5)}); do [ -b {path} ] && exit 0; sleep 0.2; done; "
        f"echo 'no {path}' >&2; exit 1",
        timeout=timeout + 10,
    )
    return path


def write_random(lab: Lab, node: str, dev: str, seek_mib: int, mib: int = 4, timeout: float = 120) -> str:
    """Write `mib` MiB of fresh random data at `seek_mib` with O_DIRECT; returns its sha256."""
    out = lab.run(
        node,
        f"head -c {mib}M /dev/urandom > /tmp/blk && "
        f"dd if=/tmp/blk of={dev} bs=1M count={mib} seek={seek_mib} oflag=direct conv=fsync "
        f"status=none && sha256sum < /tmp/blk",
        timeout=timeout,
    ).stdout
    return out.split()[0]


def read_sha(lab: Lab, node: str, dev: str, skip_mib: int, mib: int = 4, timeout: float = 120) -> str:
    """sha256 of `mib` MiB at `skip_mib`, read with O_DIRECT (from the device, not the page cache)."""
    out = lab.run(
        node, f"dd if={dev} bs=1M count={mib} skip={skip_mib} iflag=direct status=none | sha256sum", timeout=timeout
    ).stdout
    return out.split()[0]


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    t0 = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
