"""Hand-over tests drive Berth in the lab exactly like tests/berth_lab: same `berth` fixture."""

from tests.berth_lab.conftest import berth  # noqa: F401  (a fixture, used by name)
