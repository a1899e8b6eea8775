"""Restricted SSH access through the real sshd (docs/storage-host.md): the key that the storage host holds to
berth-host runs Berth's operations and nothing else, and each refusal is logged on the host. csi-sanity's
profiles drive every controller operation through such a key (sanity/runner.py)."""

from __future__ import annotations

import json
import shlex

import pytest

from csi_driver.storage.berth_host import REFUSED_EXIT
from csi_driver.storage.runner import berth_host_program, remote_command
from sanity.runner import RESTRICTED_KEY, restrict_host_access

pytestmark = pytest.mark.lab

SSH = (f"ssh -i {RESTRICTED_KEY} -o BatchMode=yes -o StrictHostKeyChecking=accept-new "
       "-o UserKnownHostsFile=/var/lib/berth/known_hosts -T root@198.18.0.1")  # fmt: skip


def over_the_key(lab, *argv: str, input: str | None = None):
    """argv on the storage host the way Berth's runner sends it: one quoted command line for ssh."""
    command = f" -- {shlex.quote(remote_command(argv))}" if argv else ""
    return lab.run("node1", SSH + command, check=False, timeout=60, input=input)


def test_the_restricted_key_runs_berths_operations_and_nothing_else(lab):
    restrict_host_access(lab, "node1")
    listed = over_the_key(lab, "lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "lv_name", "berth")
    assert listed.rc == 0 and '"report"' in listed.stdout, listed.stderr

    for argv in [
        (),  # an interactive login
        ("id",),
        ("sh", "-c", "id"),
        ("python3", "-c", "import os; os.system('id')"),
        ("lvs", "--config", 'global{thin_check_executable="/bin/id"}', "berth"),
    ]:
        refused = over_the_key(lab, *argv)
        assert refused.rc == REFUSED_EXIT and "berth-host: refused" in refused.stderr, (argv, refused.stderr)

    # The runner's resident berth_host.py: let through by its digest, and as strict as the forced command.
    lvs = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "lv_name", "berth"]
    requests = [{"v": 1, "argv": lvs}, {"v": 1, "argv": ["lvs", "--config", "global{}", "berth"]},
                {"v": 1, "argv": ["id"]}]  # fmt: skip
    served = over_the_key(lab, "python3", "-c", berth_host_program(), "--serve",
                          input="".join(json.dumps(r) + "\n" for r in requests))  # fmt: skip
    answers = [json.loads(line) for line in served.stdout.splitlines()]
    assert served.rc == 0 and len(answers) == 3, served.stderr
    assert answers[0]["rc"] == 0 and '"report"' in answers[0]["stdout"], answers[0]
    assert "refused" in answers[1] and "refused" in answers[2], answers

    logged = lab.run("storage", "journalctl -t berth-host --no-pager -n 20").stdout
    assert "berth-host: refused 'id'" in logged, logged
