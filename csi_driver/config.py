"""Berth's configuration file: YAML, validated at start-up against typed dataclasses.

A wrong key, a wrong type or a missing field stops the program with one message that names the file, the key
path and what was expected, so an operator never has to read a traceback to fix a typo.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_DRIVER_NAME = "berth.csi.io"
# A ratio above this is a typo, not a policy: it would let one volume promise 100 times the pool.
MAX_OVER_PROVISIONING_RATIO = 100.0
# Volume IDs are "<backend>/<vol- or snap- + 20 hex>": this keeps them within CSI's 128 bytes.
MAX_BACKEND_NAME_BYTES = 100
_BACKEND_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_.-]*")


class ConfigError(Exception):
    """The configuration file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class HostConfig:
    """How the controller reaches a storage host: `local` runs commands in-process, anything else is SSH."""

    address: str
    ssh_port: int = 22
    ssh_user: str = "root"
    ssh_identity_file: str | None = None
    ssh_known_hosts_file: str | None = None
    # "yes" in production (pin the host key in ssh_known_hosts_file); "accept-new" trusts the first key seen.
    ssh_strict_host_key_checking: Literal["yes", "accept-new"] = "yes"
    # Bounds how long a call to a dead host waits before UNAVAILABLE (docs/storage-host.md).
    ssh_connect_timeout_seconds: int = 10


@dataclass(frozen=True)
class LvmConfig:
    volume_group: str
    thin_pool: str
    # Thin pools can promise more than they hold: the volumes' sizes may add up to the pool's size times this
    # ratio (GetCapacity reports free space times it), and no single volume may be larger than that either.
    over_provisioning_ratio: float = 1.0
    # New volumes and snapshots are refused once the pool's data or metadata use reaches this percentage, so that
    # the pool never fills (a full thin pool fails every write to an unwritten block of every volume in it).
    full_threshold_percent: float = 95.0


@dataclass(frozen=True)
class IscsiConfig:
    portals: list[str]
    iqn_prefix: str = "iqn.2026-11.io.csi.berth"


@dataclass(frozen=True)
class NfsConfig:
    server: str
    export_root: str = "/srv/berth"
    filesystem: Literal["xfs", "ext4"] = "xfs"
    # root_squash: root on a node is nobody on the export (docs/nfs.md); a StorageClass may ask for more.
    export_options: str = "rw,sync,no_subtree_check,root_squash"


@dataclass(frozen=True)
class BackendConfig:
    protocol: Literal["iscsi", "nfs"]
    host: HostConfig
    lvm: LvmConfig
    iscsi: IscsiConfig | None = None
    nfs: NfsConfig | None = None


@dataclass(frozen=True)
class NodeConfig:
    # Survives a node plugin restart: the stage records NodeUnstage needs live here.
    state_dir: str = "/var/lib/kubelet/plugins/berth.csi.io"
    max_volumes_per_node: int = 0
    # CIDRs of the storage network(s); only addresses inside them go into the node ID (the NFS export client
    # list). Empty: every global address, which on a real node includes pod bridges and NAT addresses.
    storage_networks: list[str] = field(default_factory=list)
    protocols: list[Literal["iscsi", "nfs"]] = field(default_factory=lambda: ["iscsi", "nfs"])


@dataclass(frozen=True)
class Config:
    driver_name: str = DEFAULT_DRIVER_NAME
    backends: dict[str, BackendConfig] = field(default_factory=dict)
    default_backend: str | None = None
    node: NodeConfig = field(default_factory=NodeConfig)


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; `None` means built-in defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    try:
        config: Config = _build(Config, data, "")
        _check_consistency(config)
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None
    return config


def parse_config(data: Any) -> Config:
    """Validate an already-parsed mapping (tests, embedded configs)."""
    config: Config = _build(Config, data, "")
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    for name, backend in config.backends.items():
        if not _BACKEND_NAME_RE.fullmatch(name) or len(name) > MAX_BACKEND_NAME_BYTES:
            raise ConfigError(
                f"key 'backends.{name}': a backend name is 1-{MAX_BACKEND_NAME_BYTES} of [A-Za-z0-9+_.-], starting "
                "alphanumeric (it is part of every volume ID)"
            )
        ratio = backend.lvm.over_provisioning_ratio
        if not 0 < ratio <= MAX_OVER_PROVISIONING_RATIO:
            raise ConfigError(
                f"key 'backends.{name}.lvm.over_provisioning_ratio': expected a number above 0 and at most "
                f"{MAX_OVER_PROVISIONING_RATIO:g}, got {ratio:g}"
            )
        if not 0 < backend.lvm.full_threshold_percent <= 100:
            raise ConfigError(
                f"key 'backends.{name}.lvm.full_threshold_percent': expected a percentage above 0 and at most 100, "
                f"got {backend.lvm.full_threshold_percent:g}"
            )
        if not 1 <= backend.host.ssh_connect_timeout_seconds <= 120:
            raise ConfigError(f"key 'backends.{name}.host.ssh_connect_timeout_seconds': expected 1 to 120 seconds")
        if backend.protocol == "iscsi" and backend.iscsi is None:
            raise ConfigError(f"key 'backends.{name}.iscsi': required when protocol is 'iscsi'")
        if backend.protocol == "nfs" and backend.nfs is None:
            raise ConfigError(f"key 'backends.{name}.nfs': required when protocol is 'nfs'")
        if backend.iscsi is not None and not backend.iscsi.portals:
            raise ConfigError(f"key 'backends.{name}.iscsi.portals': expected at least one 'address:port'")
        _check_context_sizes(name, backend)
    for i, network in enumerate(config.node.storage_networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"key 'node.storage_networks[{i}]': expected a network like '198.18.0.0/24', got {network!r}"
            ) from None
    if config.default_backend is not None and config.default_backend not in config.backends:
        known = ", ".join(sorted(config.backends)) or "none"
        raise ConfigError(
            f"key 'default_backend': names backend {config.default_backend!r}, which is not defined "
            f"(defined: {known})"
        )


def _check_context_sizes(name: str, backend: BackendConfig) -> None:
    """What Berth derives from these keys travels in volume and publish contexts, whose strings CSI limits to 128
    bytes: the target IQN (<iqn_prefix>:<lv>), the portal list and the export path (<export_root>/<lv>)."""
    limits = []
    if backend.iscsi is not None:
        limits += [
            ("iscsi.iqn_prefix", backend.iscsi.iqn_prefix, MAX_BACKEND_NAME_BYTES),
            ("iscsi.portals", ",".join(backend.iscsi.portals), 128),
        ]
    if backend.nfs is not None:
        limits.append(("nfs.export_root", backend.nfs.export_root, MAX_BACKEND_NAME_BYTES))
    for key, value, limit in limits:
        if len(value.encode()) > limit:
            raise ConfigError(
                f"key 'backends.{name}.{key}': at most {limit} bytes (CSI limits the volume and publish contexts "
                f"made from it), got {len(value.encode())}"
            )


def _where(key_path: str) -> str:
    return f"key '{key_path}'" if key_path else "top level"


def _describe(value: Any) -> str:
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}
    text = kind.get(type(value), type(value).__name__)
    if isinstance(value, (str, int, float, bool)):
        text += f" ({value!r})"
    return text


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0]).removeprefix('a ')}s"
    if origin is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(
        annotation, str(annotation)
    )


def _build(annotation: Any, value: Any, key_path: str) -> Any:
    """Turn parsed YAML into `annotation`, raising ConfigError that names the key on any mismatch."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build_dataclass(annotation, value, key_path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        non_null = [arg for arg in args if arg is not type(None)]
        if len(non_null) == 1:
            return _build(non_null[0], value, key_path)
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(annotation)
            return [_build(item_type, item, f"{key_path}[{i}]") for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_type, item_type = typing.get_args(annotation)
            return {
                _build(key_type, key, key_path): _build(item_type, item, f"{key_path}.{key}")
                for key, item in value.items()
            }
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation in (str, int, bool):
        if type(value) is annotation:
            return value
    raise ConfigError(f"{_where(key_path)}: expected {_type_name(annotation)}, got {_describe(value)}")


def _build_dataclass(cls: Any, value: Any, key_path: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{_where(key_path)}: expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{key_path}." if key_path else ""
    for key in value:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"key '{prefix}{key}': unknown key (allowed here: {allowed})")
    kwargs = {}
    for name, spec in fields.items():
        if name in value:
            kwargs[name] = _build(hints[name], value[name], prefix + name)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"key '{prefix}{name}': missing, expected {_type_name(hints[name])}")
    return cls(**kwargs)
