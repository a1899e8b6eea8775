"""In-memory stand-in for the parts of rtslib_fb 2.1 that lio_host uses.

It mirrors rtslib's object model and modes ('any' / 'lookup' / 'create', lookup-vs-create by
argument for LUN, MappedLUN and storage objects) so lio_host's logic can be tested without configfs.
Also importable as `rtslib_fb` (copied onto PYTHONPATH) for the end-to-end subprocess test.
"""

from __future__ import annotations

from types import SimpleNamespace

STATE: dict = {}
# Set False to emulate kernels without the per-ACL 'authentication' attribute (< 5.19).
ACL_AUTH_ATTRIBUTE = True


# rtslib_fb.tcm's per-process map of backstore indexes (name -> index), filled from configfs when empty.
tcm = SimpleNamespace(bs_cache={})


def reset() -> None:
    STATE.clear()
    STATE.update(targets={}, storage={}, saves=[], dumps=[])
    tcm.bs_cache.clear()


reset()


class RTSLibError(Exception):
    pass


class RTSLibNotInCFS(RTSLibError):
    pass


def _mode(exists: bool, mode: str, what: str) -> None:
    if mode == "lookup" and not exists:
        raise RTSLibNotInCFS(f"No such {what} in configfs")
    if mode == "create" and exists:
        raise RTSLibError(f"{what} already exists in configFS")


class _Node:
    def __init__(self):
        self.attributes: dict[str, str] = {}

    def set_attribute(self, name, value):
        self.attributes[name] = str(value)

    def get_attribute(self, name):
        return self.attributes[name]


class _Fabric:
    name = "iscsi"

    @property
    def exists(self):
        return True

    @property
    def targets(self):
        return [Target(self, wwn, "lookup") for wwn in sorted(STATE["targets"])]


def FabricModule(name):  # noqa: N802 - rtslib's spelling
    assert name == "iscsi"
    return _Fabric()


class Target:
    def __init__(self, fabric, wwn=None, mode="any"):
        wwn = wwn.lower()
        _mode(wwn in STATE["targets"], mode, f"target {wwn}")
        self.wwn = wwn
        STATE["targets"].setdefault(wwn, {"tpgs": {}})

    @property
    def tpgs(self):
        return [TPG(self, t, "lookup") for t in STATE["targets"][self.wwn]["tpgs"]]

    def delete(self):
        for tpg in self.tpgs:
            tpg.delete()
        del STATE["targets"][self.wwn]

    def dump(self):
        STATE["dumps"].append(self.wwn)
        return {"wwn": self.wwn, "fabric": "iscsi", "tpgs": repr(STATE["targets"][self.wwn]["tpgs"])}


class TPG(_Node):
    def __init__(self, target, tag=None, mode="any"):
        tpgs = STATE["targets"][target.wwn]["tpgs"]
        _mode(tag in tpgs, mode, f"tpg {tag}")
        self.parent_target, self.tag = target, tag
        self._d = tpgs.setdefault(
            tag, {"attrs": {"authentication": "1"}, "enable": False, "luns": {}, "nps": {}, "acls": {}}
        )
        super().__init__()
        self.attributes = self._d["attrs"]

    enable = property(lambda s: s._d["enable"], lambda s, v: s._d.__setitem__("enable", bool(v)))

    @property
    def luns(self):
        return [LUN(self, n) for n in sorted(self._d["luns"])]

    @property
    def network_portals(self):
        return [NetworkPortal(self, ip, port, "lookup") for ip, port in sorted(self._d["nps"])]

    @property
    def node_acls(self):
        return [NodeACL(self, w, "lookup") for w in sorted(self._d["acls"])]

    def delete(self):
        self.enable = False
        for acl in self.node_acls:
            acl.delete()
        for lun in self.luns:
            lun.delete()
        del STATE["targets"][self.parent_target.wwn]["tpgs"][self.tag]


class LUN:
    def __init__(self, tpg, lun=None, storage_object=None, alias=None):
        self.parent_tpg, self.lun = tpg, lun
        if storage_object is not None:
            _mode(lun in tpg._d["luns"], "create", f"lun {lun}")
            tpg._d["luns"][lun] = storage_object.name
        else:
            _mode(lun in tpg._d["luns"], "lookup", f"lun {lun}")

    @property
    def storage_object(self):
        return BlockStorageObject(self.parent_tpg._d["luns"][self.lun])

    def delete(self):
        for acl in self.parent_tpg.node_acls:
            for m in acl.mapped_luns:
                if m.tpg_lun.lun == self.lun:
                    m.delete()
        del self.parent_tpg._d["luns"][self.lun]


class NetworkPortal:
    def __init__(self, tpg, ip_address, port=3260, mode="any"):
        key = (ip_address, int(port))
        _mode(key in tpg._d["nps"], mode, f"portal {key}")
        tpg._d["nps"][key] = True
        self.parent_tpg, self.ip_address, self.port = tpg, ip_address, int(port)

    def delete(self):
        del self.parent_tpg._d["nps"][(self.ip_address, self.port)]


def _auth(attr):
    return property(
        lambda s: s._d["auth"].get(attr, ""),
        lambda s, v: s._d["auth"].__setitem__(attr, v.strip()),
    )


class NodeACL(_Node):
    def __init__(self, tpg, node_wwn, mode="any"):
        node_wwn = node_wwn.lower()
        _mode(node_wwn in tpg._d["acls"], mode, f"acl {node_wwn}")
        self._d = tpg._d["acls"].setdefault(node_wwn, {"auth": {}, "attrs": {}, "mapped": {}})
        self.parent_tpg, self.node_wwn = tpg, node_wwn
        super().__init__()
        self.attributes = self._d["attrs"]

    chap_userid = _auth("userid")
    chap_password = _auth("password")
    chap_mutual_userid = _auth("userid_mutual")
    chap_mutual_password = _auth("password_mutual")
    session = None

    def set_attribute(self, name, value):
        if name == "authentication" and not ACL_AUTH_ATTRIBUTE:
            raise RTSLibError(f"Cannot find attribute: {name}")
        super().set_attribute(name, value)

    @property
    def mapped_luns(self):
        return [MappedLUN(self, n) for n in sorted(self._d["mapped"])]

    def delete(self):
        del self.parent_tpg._d["acls"][self.node_wwn]


class MappedLUN:
    def __init__(self, acl, mapped_lun, tpg_lun=None, write_protect=None, alias=None):
        self.parent_nodeacl, self.mapped_lun = acl, mapped_lun
        if tpg_lun is not None:
            _mode(mapped_lun in acl._d["mapped"], "create", f"mapped lun {mapped_lun}")
            lun = tpg_lun.lun if isinstance(tpg_lun, LUN) else int(tpg_lun)
            acl._d["mapped"][mapped_lun] = {"tpg_lun": lun, "wp": bool(write_protect)}
        else:
            _mode(mapped_lun in acl._d["mapped"], "lookup", f"mapped lun {mapped_lun}")

    write_protect = property(
        lambda s: s.parent_nodeacl._d["mapped"][s.mapped_lun]["wp"],
        lambda s, v: s.parent_nodeacl._d["mapped"][s.mapped_lun].__setitem__("wp", bool(v)),
    )

    @property
    def tpg_lun(self):
        return LUN(self.parent_nodeacl.parent_tpg, self.parent_nodeacl._d["mapped"][self.mapped_lun]["tpg_lun"])

    def delete(self):
        del self.parent_nodeacl._d["mapped"][self.mapped_lun]


class BlockStorageObject(_Node):
    plugin = "block"

    def __init__(self, name, dev=None, wwn=None, readonly=False, write_back=False, index=None):
        _mode(name in STATE["storage"], "create" if dev else "lookup", f"storage object {name}")
        if dev:
            # As the kernel makes a block backstore: UNMAP emulation off.
            attrs = {"emulate_tpu": "0", "emulate_tpws": "0"}
            STATE["storage"][name] = {"dev": dev, "wwn": wwn or "generated-serial", "attrs": attrs}
        self.name = name
        self._d = STATE["storage"][name]
        super().__init__()
        self.attributes = self._d["attrs"]

    udev_path = property(lambda s: s._d["dev"])
    wwn = property(lambda s: s._d["wwn"])

    @property
    def attached_luns(self):
        for t in STATE["targets"].values():
            for tpg in t["tpgs"].values():
                for so_name in tpg["luns"].values():
                    if so_name == self.name:
                        yield so_name

    def delete(self):
        del STATE["storage"][self.name]

    def dump(self):
        STATE["dumps"].append(self.name)
        return {
            "name": self.name, "plugin": "block", "dev": self._d["dev"], "wwn": self._d["wwn"],
            "attributes": dict(self._d["attrs"]),
        }  # fmt: skip


class RTSRoot:
    @property
    def storage_objects(self):
        return [BlockStorageObject(name) for name in sorted(STATE["storage"])]

    def dump(self):
        STATE["dumps"].append("everything")
        return {
            "fabric_modules": [],
            "storage_objects": [BlockStorageObject(name).dump() for name in sorted(STATE["storage"])],
            "targets": [t.dump() for t in _Fabric().targets],
        }
