"""A CommandRunner double: records every argv and answers from canned responses."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from csi_driver.storage.errors import CommandFailed
from csi_driver.storage.runner import CommandResult


@dataclass
class Call:
    argv: list[str]
    input: bytes | None
    timeout: float
    check: bool


Responder = Callable[[list[str], bytes | None], tuple[int, str, str]]


@dataclass
class FakeRunner:
    """Rules are (argv prefix, responder); the LAST matching rule answers (later rules override)."""

    rules: list[tuple[tuple[str, ...], Responder]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def on(self, *prefix: str, stdout: str = "", rc: int = 0, stderr: str = "") -> FakeRunner:
        self.rules.append((prefix, lambda argv, inp: (rc, stdout, stderr)))
        return self

    def on_call(self, *prefix: str, responder: Responder) -> FakeRunner:
        self.rules.append((prefix, responder))
        return self

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60, check: bool = True
    ) -> CommandResult:
        args = list(argv)
        assert all(isinstance(a, str) for a in args), args
        self.calls.append(Call(args, input, timeout, check))
        for prefix, responder in reversed(self.rules):
            if tuple(args[: len(prefix)]) == prefix:
                rc, out, err = responder(args, input)
                break
        else:
            raise AssertionError(f"unexpected command {args}")
        if check and rc != 0:
            raise CommandFailed(args, rc, err, out)
        return CommandResult(rc, out.encode(), err.encode())

    def close(self) -> None:
        pass

    def argvs(self, program: str | None = None) -> list[list[str]]:
        return [c.argv for c in self.calls if program is None or c.argv[0] == program]


def lv_row(
    name: str,
    size: int = 1073741824,
    tags: Sequence[str] = (),
    attr: str = "Vwi-a-tz--",
    origin: str = "",
    pool: str = "pool",
    vg: str = "berth",
    data_percent: str = "0.00",
) -> dict[str, str]:
    """One row as `lvs --reportformat json --units b --nosuffix` prints it (all values strings)."""
    return {
        "lv_name": name,
        "vg_name": vg,
        "lv_uuid": "Xk3c2M-1bQz-Hc5P-Vb6Q-n3Jx-8AqT-2fPZ1e",
        "lv_size": str(size),
        "lv_attr": attr,
        "lv_tags": ",".join(tags),
        "origin": origin,
        "pool_lv": pool,
        "lv_time": "2025-11-26 06:50:01 +0000",
        "data_percent": data_percent,
        "metadata_percent": "",
    }


def lvs_json(*rows: dict[str, str]) -> str:
    # Same shape (and indentation style) as lvm2 2.03.16's JSON report.
    return json.dumps({"report": [{"lv": list(rows)}]}, indent=6)


def vgs_json(extent: int = 4194304, name: str = "berth") -> str:
    row = {"vg_name": name, "vg_extent_size": str(extent), "vg_size": "21470642176", "vg_free": "0"}
    return json.dumps({"report": [{"vg": [row]}]}, indent=6)
