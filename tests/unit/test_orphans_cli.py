"""`berth orphans` as a command: dispatch from `berth`, exit status, text and JSON output."""

import json

from csi_driver import cli


def test_berth_orphans_runs_the_audit_and_prints_json(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"node:\n  state_dir: {tmp_path / 'state'}\n")
    assert cli.main(["orphans", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"version": 1, "scope": "storage", "older_than_seconds": 3600, "remove": False,
                      "orphans": [], "errors": []}  # fmt: skip


def test_an_unknown_backend_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    assert cli.main(["orphans", "--config", str(config), "--backend", "nope"]) == 2
    assert "no backend nope" in capsys.readouterr().err
