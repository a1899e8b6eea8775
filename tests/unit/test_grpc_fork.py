"""Commands forked (with Python run in the child, as os-brick's are) while Berth's gRPC server is busy."""

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import os, subprocess, sys, tempfile, threading
    from concurrent import futures
    import csi_driver  # first, as in Berth's entry points
    import grpc
    from csi_driver.csi import csi_pb2, csi_pb2_grpc

    class Identity(csi_pb2_grpc.IdentityServicer):
        def Probe(self, request, context):
            return csi_pb2.ProbeResponse()

    socket = "unix:" + tempfile.mkdtemp() + "/csi.sock"
    server = grpc.server(futures.ThreadPoolExecutor(4))
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), server)
    server.add_insecure_port(socket)
    server.start()
    stub = csi_pb2_grpc.IdentityStub(grpc.insecure_channel(socket))
    running = True

    def probe_forever():
        while running:
            stub.Probe(csi_pb2.ProbeRequest())

    for _ in range(2):
        threading.Thread(target=probe_forever, daemon=True).start()
    died = [rc for rc in (subprocess.run(["true"], preexec_fn=lambda: None).returncode for _ in range(300)) if rc]
    running = False
    print(len(died))
    # Leave as Berth does (cli._exit_now): a finalizing interpreter with grpc's threads still running could abort or
    # hang here (1 run in 8 on this machine), which is not what the test is about.
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_commands_forked_beside_a_busy_grpc_server_are_not_killed():
    # Without GRPC_ENABLE_FORK_SUPPORT=0 about 1 command in 15 died of SIGABRT here (grpcio 1.85).
    env = {"PATH": os.environ.get("PATH", os.defpath)}  # no GRPC_* from the caller
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0", f"commands killed: {out.stdout.strip()}\n{out.stderr[-2000:]}"
