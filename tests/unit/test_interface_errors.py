"""Each interface method says which domain errors it raises ("Raises X (when ...), Y (when ...)."), naming only
classes that exist: the services map exactly those classes to gRPC codes, so a renamed or invented name must fail."""

from __future__ import annotations

import inspect
import re
from types import ModuleType

import pytest

from csi_driver.node import errors as node_errors
from csi_driver.node.commands import Runner
from csi_driver.node.iscsi import Connector
from csi_driver.node.protocol import VolumeProtocol
from csi_driver.storage import errors as storage_errors
from csi_driver.storage.backend import Exporter
from csi_driver.storage.runner import CommandRunner

INTERFACES: list[tuple[type, ModuleType]] = [
    (Exporter, storage_errors),
    (CommandRunner, storage_errors),
    (VolumeProtocol, node_errors),
    (Connector, node_errors),
    (Runner, node_errors),
]
# A CamelCase word such as Busy, InUse or CommandTimeout; ALLCAPS (LUN, NFS) and lowercase words are prose.
CLASS_NAME = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]*)*\b")
NONE_RAISED = ("nothing", "no domain error")


def methods(interface: type) -> list[str]:
    """The public methods the Protocol itself defines (properties and dunders excluded)."""
    return [name for name, value in vars(interface).items() if not name.startswith("_") and inspect.isfunction(value)]


CASES = [(interface, module, name) for interface, module in INTERFACES for name in methods(interface)]


@pytest.mark.parametrize(("interface", "module", "name"), CASES, ids=[f"{i.__name__}.{n}" for i, _, n in CASES])
def test_method_lists_the_errors_it_raises(interface: type, module: ModuleType, name: str) -> None:
    doc = inspect.getdoc(getattr(interface, name)) or ""
    assert "Raises" in doc, f"{interface.__name__}.{name}: no 'Raises ...' line in its docstring"
    raises = " ".join(doc.split("Raises", 1)[1].split())
    named = CLASS_NAME.findall(raises)
    assert named or raises.startswith(NONE_RAISED), f"{interface.__name__}.{name}: 'Raises {raises}' names no class"
    unknown = [n for n in named if not is_error_class(getattr(module, n, None))]
    assert not unknown, f"{interface.__name__}.{name} names {unknown}, not error classes of {module.__name__}"


def is_error_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, Exception)


def test_every_interface_has_methods() -> None:
    for interface, _ in INTERFACES:
        assert methods(interface), interface.__name__
