"""The fault tests use the Berth fixture of the lab tests (controller + node on node1, node on node2)."""

from tests.berth_lab.conftest import berth  # noqa: F401  (a fixture, used by name)
