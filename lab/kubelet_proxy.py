"""The lab apiserver's way to the kubelets: an HTTP CONNECT proxy on a unix socket (its egress selector).

The kubelets listen on the node guests' data addresses (198.18.0.x:10250), which this host cannot route to; each
node forwards its kubelet port to a loopback port here instead (a qemu hostfwd). kube-apiserver's
EgressSelectorConfiguration sends every connection to the cluster through this proxy, which maps the node address
it is asked for to that loopback port. With it, `kubectl logs/exec/port-forward` work, and so does the e2e suite,
which runs its node commands through `exec`.

    python -m lab.kubelet_proxy SOCKET ROUTES_JSON      # ROUTES_JSON: {"198.18.0.11:10250": 41234, ...}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

MAX_REQUEST = 8192


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def parse_connect(head: bytes) -> str:
    """The host:port of a `CONNECT host:port HTTP/1.1` request head; ValueError for anything else."""
    method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    if method != "CONNECT":
        raise ValueError(f"only CONNECT is served, not {method}")
    return target


async def serve_one(routes: dict[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        target = parse_connect(head[:MAX_REQUEST])
        port = routes.get(target)
        if port is None:
            raise LookupError(f"no route to {target}")
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
    except (ValueError, LookupError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        writer.write(f"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nX-Reason: {e}\r\n\r\n".encode())
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def main(socket_path: str, routes: dict[str, int]) -> None:
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = await asyncio.start_unix_server(lambda r, w: serve_one(routes, r, w), socket_path, limit=MAX_REQUEST)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with open(sys.argv[2]) as f:
        asyncio.run(main(sys.argv[1], json.load(f)))
