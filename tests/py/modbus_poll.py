"""A SCADA poller for long runs: Modbus/TCP reads made with pymodbus (PyPI), forever.

  modbus_poll.py HOST:PORT [--interval S] [--session S] [--timeout S]

Reads holding registers 0..9 every --interval seconds (default 0.05) and checks that they
hold what modbus_plc.py starts with (register i = i). Every --session seconds (default 5)
it closes the connection and opens a new one, so the proxies in between make new TLS
handshakes with whatever certificates they hold by then. A failed request (exception,
wrong values, timeout, closed connection, refused connect) is counted and the connection
is made again after a short pause: a soak run wants the count, not a stop.

Once a second, and once more on SIGTERM/SIGINT before it exits 0, it prints one JSON line:
  {"ok": N, "failed": N, "sessions": N, "last_error": "..." | null}
with totals since it started.
"""

import json
import logging
import signal
import sys
import time

from pymodbus.client import ModbusTcpClient

USAGE = "usage: modbus_poll.py HOST:PORT [--interval S] [--session S] [--timeout S]"

EXPECTED = list(range(10))


class Stop(Exception):
    """SIGTERM or SIGINT: print the totals and leave."""


def on_signal(_signum, _frame):
    raise Stop()


def parse(argv):
    options = {"--interval": 0.05, "--session": 5.0, "--timeout": 2.0}
    words = list(argv)
    endpoint = None
    while words:
        word = words.pop(0)
        if word in options:
            if not words:
                raise ValueError(f"{word} needs a value")
            value = float(words.pop(0))
            if value < 0 or (word != "--interval" and value == 0):
                raise ValueError(f"{word} must be above 0")
            options[word] = value
        elif endpoint is None:
            endpoint = word
        else:
            raise ValueError(f"unexpected argument {word!r}")
    if endpoint is None:
        raise ValueError("HOST:PORT is missing")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {endpoint!r}")
    return host, int(port), options


class Totals:
    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.sessions = 0
        self.last_error = None

    def fail(self, error):
        self.failed += 1
        self.last_error = error

    def emit(self):
        print(json.dumps({"ok": self.ok, "failed": self.failed, "sessions": self.sessions,
                          "last_error": self.last_error}), flush=True)


def poll(host, port, options, totals):
    last_print = time.monotonic()
    client = None
    session_end = 0.0
    while True:
        now = time.monotonic()
        if now - last_print >= 1.0:
            totals.emit()
            last_print = now
        if client is not None and now >= session_end:
            client.close()
            client = None
        if client is None:
            # retries=0: a lost answer is counted, not hidden by a resend.
            client = ModbusTcpClient(host, port=port, timeout=options["--timeout"], retries=0)
            if not client.connect():
                totals.fail("connect refused or timed out")
                client.close()
                client = None
                time.sleep(0.2)
                continue
            totals.sessions += 1
            session_end = now + options["--session"]
        try:
            response = client.read_holding_registers(0, count=10, device_id=1)
            if response.isError():
                totals.fail(f"exception {getattr(response, 'exception_code', None)}")
            elif list(response.registers) != EXPECTED:
                totals.fail(f"read {list(response.registers)}")
            else:
                totals.ok += 1
        except Stop:
            raise
        except Exception as error:  # pymodbus raises several kinds for a lost connection
            totals.fail(f"{type(error).__name__}: {error}")
            client.close()
            client = None
            time.sleep(0.2)
            continue
        if options["--interval"]:
            time.sleep(options["--interval"])


def main(argv):
    try:
        host, port, options = parse(argv)
    except ValueError as error:
        print(f"modbus_poll.py: {error}\n{USAGE}", file=sys.stderr)
        return 64
    # pymodbus logs lost connections as errors; the totals already count them.
    logging.basicConfig(level=logging.CRITICAL, stream=sys.stderr)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    totals = Totals()
    try:
        poll(host, port, options, totals)
    except Stop:
        pass
    totals.emit()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
