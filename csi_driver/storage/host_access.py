"""Restricted SSH access, the controller's side: `berth host-command` prints the storage host's forced command
(berth_host.py) with the digests of this release's host programs filled in (docs/storage-host.md)."""

from __future__ import annotations

import hashlib

from . import lio, nfs, runner, thin_metadata

PLACEHOLDER = "PROGRAM_DIGESTS: frozenset[str] = frozenset()"


def program_digests() -> list[str]:
    """SHA-256 of each host program's source, exactly as the controller sends it (`python3 -c <source>`)."""
    sources = (lio.host_program(), nfs.host_program(), thin_metadata.host_program(), runner.berth_host_program())
    return sorted(hashlib.sha256(source.encode()).hexdigest() for source in sources)


def berth_host_script() -> str:
    """/usr/local/sbin/berth-host for this release: an executable python3 script."""
    source = runner.berth_host_program()
    if PLACEHOLDER not in source:
        raise RuntimeError("berth_host.py has no digest placeholder")
    filled = source.replace(PLACEHOLDER, f"PROGRAM_DIGESTS: frozenset[str] = frozenset({program_digests()!r})", 1)
    return "#!/usr/bin/python3 -IS\n" + filled  # isolated, no site: faster, and no environment reaches it
