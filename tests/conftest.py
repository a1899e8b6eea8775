"""Shared pytest setup. The storage lab fixtures (`lab`, failure artifacts) come from lab.pytest_plugin;
a test starts the lab only if it requests the `lab` fixture."""

pytest_plugins = ["lab.pytest_plugin"]
