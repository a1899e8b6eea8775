"""The lab apiserver's CONNECT proxy to the kubelets, over a real unix socket and loopback TCP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lab import kubelet_proxy


def test_parse_connect_takes_the_target_and_refuses_other_methods() -> None:
    assert kubelet_proxy.parse_connect(b"CONNECT node1:10250 HTTP/1.1\r\nHost: node1:10250\r\n\r\n") == "node1:10250"
    with pytest.raises(ValueError, match="only CONNECT"):
        kubelet_proxy.parse_connect(b"GET / HTTP/1.1\r\n\r\n")


async def _exchange(tmp: Path, target: str, payload: bytes) -> bytes:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo:" + await reader.read(100))
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    sock = str(tmp / "proxy.sock")
    proxy = asyncio.create_task(kubelet_proxy.main(sock, {"198.18.0.11:10250": port}))
    for _ in range(100):
        if Path(sock).exists():
            break
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    writer.write(payload)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    proxy.cancel()
    upstream.close()
    return answer


def test_a_known_node_is_tunnelled_to_its_forwarded_port(tmp_path: Path) -> None:
    answer = asyncio.run(_exchange(tmp_path, "198.18.0.11:10250", b"ping"))
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\necho:ping"


def test_an_unknown_node_gets_502_naming_it(tmp_path: Path) -> None:
    answer = asyncio.run(_exchange(tmp_path, "198.18.0.99:10250", b"ping"))
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway") and b"no route to 198.18.0.99:10250" in answer
