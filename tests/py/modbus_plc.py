"""A simulated PLC: a Modbus/TCP server built on pymodbus (PyPI), which nobody here wrote.

  modbus_plc.py [PORT] [--wire-log FILE]
                            serve on 127.0.0.1:PORT (default 0: any free port); with
                            --wire-log, append the hex of every chunk of bytes received to
                            FILE, one line each (what reached the PLC, before pymodbus parsed
                            it: pymodbus ignores bytes past a request's PDU, a naive PLC
                            stack may not)

Once bound it prints one line `listening <port>` on stdout, then serves until SIGTERM or
SIGINT. Unit ids are ignored (every unit id reaches the same data). The data starts with
known values so that a client can check what it reads and read back what it wrote:

  holding registers  0..199   register i = i                       (FC 3 read; 6, 16 write)
  input registers    0..199   register i = 1000 + i                (FC 4 read)
  coils              0..199   coil i = (i is even)                 (FC 1 read; 5, 15 write)
  discrete inputs    0..199   input i = (i is a multiple of 3)     (FC 2 read)

Addresses outside 0..199 answer exception 02 (illegal data address), as a real PLC would.
"""

import asyncio
import logging
import signal
import sys

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

SIZE = 200

USAGE = "usage: modbus_plc.py [PORT] [--wire-log FILE]   (PORT 0..65535, default 0: any free port)"


def plc_device():
    """The PLC's four separate tables, each addressed 0..SIZE-1."""
    coils = [SimData(0, values=[i % 2 == 0 for i in range(SIZE)], datatype=DataType.BITS)]
    inputs = [SimData(0, values=[i % 3 == 0 for i in range(SIZE)], datatype=DataType.BITS)]
    holding = [SimData(0, values=list(range(SIZE)), datatype=DataType.REGISTERS)]
    input_registers = [
        SimData(0, values=[1000 + i for i in range(SIZE)], datatype=DataType.REGISTERS)
    ]
    # id 0: this device answers every unit id.
    return SimDevice(0, simdata=(coils, inputs, holding, input_registers))


def wire_logger(path):
    """A pymodbus trace_packet hook that appends each received chunk to `path` in hex."""

    def trace(sending, data):
        if not sending:
            with open(path, "a") as log:
                log.write(data.hex() + "\n")
        return data

    return trace


async def serve(port, wire_log=None):
    trace = wire_logger(wire_log) if wire_log else None
    server = ModbusTcpServer(plc_device(), address=("127.0.0.1", port), trace_packet=trace)
    await server.serve_forever(background=True)
    bound = server.transport.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.shutdown()


def main(argv):
    wire_log = None
    if "--wire-log" in argv:
        at = argv.index("--wire-log")
        if at + 1 >= len(argv):
            print(USAGE, file=sys.stderr)
            return 64
        wire_log = argv[at + 1]
        argv = argv[:at] + argv[at + 2 :]
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(USAGE, file=sys.stderr)
        return 64
    port = 0
    if argv:
        try:
            port = int(argv[0])
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            print(f"modbus_plc.py: bad port {argv[0]!r}\n{USAGE}", file=sys.stderr)
            return 64
    # pymodbus logs every connection at INFO; the tests read stdout only, warnings suffice.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        asyncio.run(serve(port, wire_log))
    except OSError as error:
        print(f"modbus_plc.py: cannot listen on 127.0.0.1:{port}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
