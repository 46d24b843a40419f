"""A SCADA/HMI client: Modbus/TCP requests made with pymodbus (PyPI), which nobody here wrote.

  modbus_scada.py [OPTIONS] HOST:PORT STEP...
  modbus_scada.py [OPTIONS] HOST:PORT --json STEPS      (a JSON list, or - for stdin)
  modbus_scada.py [OPTIONS] HOST:PORT --concurrent N

Steps run in order on ONE connection (so a `sleep` keeps the session open, e.g. while the
proxy rotates its certificates). Each step is a name and its arguments:

  read_coils ADDR COUNT           FC 1      read_discrete ADDR COUNT       FC 2
  read_holding ADDR COUNT         FC 3      read_input ADDR COUNT          FC 4
  write_coil ADDR 0|1             FC 5      write_register ADDR VALUE      FC 6
  write_coils ADDR 1,0,1          FC 15     write_registers ADDR 1,2,3     FC 16
  diagnostics                     FC 8 (sub-function 2, read diagnostic register)
  device_info                     FC 43 (MEI 14, read device identification, basic)
  raw FC [HEX]                    any function code with HEX as its data, own framing
  send HEX                        HEX sent as is (e.g. a bad MBAP header); prints the answer
                                  frame, or that the peer closed the connection
  sleep SECONDS                   wait, the connection open

In JSON, a step is a list: [["read_holding", 0, 10], ["sleep", 2], ["raw", 8, "00000000"]].

Every step prints one JSON line: {"step", "op", "session", "result", ...} where result is
  "ok"         values in "values" (registers, or booleans for coils and inputs)
  "exception"  the server answered a Modbus exception: "isError": true, "function_code"
               (function | 0x80) and "exception_code" (1 = illegal function, 2 = address…)
  "closed"     the peer closed the connection (or reset it)
  "refused"    nothing accepts connections at HOST:PORT
  "timeout"    no answer within --timeout
"session" is the client's local port, the same for all steps of one connection.
A transport failure (closed, refused, timeout) ends the run with exit status 1; Modbus
exceptions do not (exit 0). Bad usage exits 64.

Options:
  --unit N          unit (device) id of the requests (default 1)
  --timeout S       seconds to wait for a connection or an answer (default 5)
  --repeat N        run the steps N times, each time on a new connection (default 1)
  --concurrent N    open N connections at once, then on each: read holding register i,
                    write it, read it back (i = session number mod 200); prints one summary
                    line {"sessions", "succeeded", "exceptions", "closed", "refused", ...}
"""

import asyncio
import json
import logging
import select
import socket
import struct
import sys
import time

from pymodbus.client import AsyncModbusTcpClient, ModbusTcpClient
from pymodbus.exceptions import ModbusException

USAGE = """usage: modbus_scada.py [--unit N] [--timeout S] [--repeat N] HOST:PORT STEP...
       modbus_scada.py [--unit N] [--timeout S] [--repeat N] HOST:PORT --json STEPS|-
       modbus_scada.py [--unit N] [--timeout S] HOST:PORT --concurrent N
steps: read_coils|read_discrete|read_holding|read_input ADDR COUNT, write_coil ADDR 0|1,
       write_register ADDR VALUE, write_coils ADDR 1,0,.., write_registers ADDR V,V,..,
       diagnostics, device_info, raw FC [HEX], send HEX, sleep SECONDS
(see the top of this file for the output)"""

# step name -> argument kinds, in order; "int?"/"hex?" may be left out.
STEPS = {
    "read_coils": ("int", "int"),
    "read_discrete": ("int", "int"),
    "read_holding": ("int", "int"),
    "read_input": ("int", "int"),
    "write_coil": ("int", "bit"),
    "write_register": ("int", "int"),
    "write_coils": ("int", "bits"),
    "write_registers": ("int", "ints"),
    "diagnostics": (),
    "device_info": (),
    "raw": ("int", "hex?"),
    "send": ("hex",),
    "sleep": ("float",),
}

class UsageError(Exception):
    """Bad command line or steps: reported with the usage text, exit 64."""


class TransportFailure(Exception):
    """The connection is gone or silent; `kind` is closed, refused or timeout."""

    def __init__(self, kind, detail):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def parse_value(kind, text):
    """One step argument of `kind`, from the command line (str) or JSON (str or number)."""
    name = kind.rstrip("?")
    try:
        if name == "int":
            value = int(text, 0) if isinstance(text, str) else int(text)
            if not 0 <= value <= 0xFFFF:
                raise ValueError
            return value
        if name == "bit":
            if str(text) not in ("0", "1"):
                raise ValueError
            return str(text) == "1"
        if name == "float":
            value = float(text)
            if value < 0:
                raise ValueError
            return value
        if name == "ints":
            values = text if isinstance(text, list) else str(text).split(",")
            return [parse_value("int", v if isinstance(v, int) else str(v)) for v in values]
        if name == "bits":
            values = text if isinstance(text, list) else str(text).split(",")
            return [parse_value("bit", v) for v in values]
        if name == "hex":
            return bytes.fromhex(str(text))
    except (ValueError, TypeError):
        pass
    raise UsageError(f"bad {name} argument {text!r}")


def parse_steps(tokens):
    """Command-line words -> [(name, [args])]: a step name starts a step."""
    steps = []
    i = 0
    while i < len(tokens):
        name = tokens[i]
        if name not in STEPS:
            raise UsageError(f"unknown step {name!r}")
        i += 1
        args = []
        for kind in STEPS[name]:
            if i < len(tokens) and tokens[i] not in STEPS:
                args.append(parse_value(kind, tokens[i]))
                i += 1
            elif not kind.endswith("?"):
                raise UsageError(f"step {name} needs {len(STEPS[name])} argument(s)")
        steps.append((name, args))
    return steps


def parse_json_steps(text):
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--json: not JSON: {error}") from None
    if not isinstance(raw, list):
        raise UsageError("--json: expected a list of steps")
    steps = []
    for item in raw:
        if not (isinstance(item, list) and item and item[0] in STEPS):
            raise UsageError(f"--json: bad step {item!r}")
        name, values = item[0], item[1:]
        kinds = STEPS[name]
        required = sum(1 for k in kinds if not k.endswith("?"))
        if not required <= len(values) <= len(kinds):
            raise UsageError(f"step {name} needs {len(kinds)} argument(s)")
        steps.append((name, [parse_value(k, v) for k, v in zip(kinds, values)]))
    return steps


def parse_endpoint(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def connection_state(sock):
    """'closed' when the peer has closed or reset `sock`, else 'open'."""
    if sock is None:
        return "closed"
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable and sock.recv(1, socket.MSG_PEEK) == b"":
            return "closed"
    except OSError:
        return "closed"
    return "open"


class Session:
    """One connection to the server, made by pymodbus's synchronous TCP client."""

    def __init__(self, host, port, unit, timeout):
        self.unit = unit
        self.timeout = timeout
        self.transaction = 0x4000  # raw frames use their own ids, apart from pymodbus's
        # retries=0: a lost answer is reported, not hidden by a resend.
        self.client = ModbusTcpClient(host, port=port, timeout=timeout, retries=0)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError as error:
            raise TransportFailure("refused", str(error)) from None
        except TimeoutError as error:
            raise TransportFailure("timeout", f"connect: {error}") from None
        except OSError as error:
            raise TransportFailure("refused", str(error)) from None
        # The client would reconnect on its own when its socket is gone; it gets ours, and a
        # lost connection is detected below before any reconnect could hide it.
        self.client.socket = self.sock
        self.local_port = self.sock.getsockname()[1]

    def close(self):
        self.client.close()
        self.sock.close()

    def check_open(self):
        if self.client.socket is not self.sock or connection_state(self.sock) == "closed":
            raise TransportFailure("closed", "the peer closed the connection")

    def call(self, method, *args, **kwargs):
        """A pymodbus request; its response, or TransportFailure."""
        self.check_open()
        try:
            response = method(*args, device_id=self.unit, **kwargs)
        except ModbusException as error:
            if self.client.socket is not self.sock or connection_state(self.sock) == "closed":
                raise TransportFailure("closed", str(error)) from None
            raise TransportFailure("timeout", str(error)) from None
        except OSError as error:
            raise TransportFailure("closed", str(error)) from None
        if response is None:
            raise TransportFailure("timeout", "no response")
        return response

    def exchange(self, frame):
        """Sends `frame` as is; returns the next whole MBAP frame the peer sends."""
        self.check_open()
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(frame)
            header = self.read_exactly(7)
            (length,) = struct.unpack(">H", header[4:6])
            return header + self.read_exactly(max(length - 1, 0))
        except TimeoutError:
            raise TransportFailure("timeout", "no answer") from None
        except OSError as error:
            raise TransportFailure("closed", str(error)) from None

    def read_exactly(self, count):
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise TransportFailure("closed", "the peer closed the connection")
            data += chunk
        return data

    def raw(self, function, data):
        self.transaction = (self.transaction + 1) & 0xFFFF
        pdu = bytes([function]) + data
        mbap = struct.pack(">HHHB", self.transaction, 0, len(pdu) + 1, self.unit)
        return self.exchange(mbap + pdu)


def pdu_result(response, count=None):
    """The printed fields of a pymodbus response."""
    if response.isError():
        return {
            "result": "exception",
            "isError": True,
            "function_code": response.function_code,
            "exception_code": getattr(response, "exception_code", None),
        }
    fields = {"result": "ok", "isError": False}
    if response.bits:
        # Bits come in whole bytes; only the asked-for ones are values.
        fields["values"] = list(response.bits[:count] if count else response.bits)
    elif response.registers:
        fields["values"] = list(response.registers)
    if hasattr(response, "information") and response.information:
        fields["values"] = {
            str(k): v.decode(errors="replace") if isinstance(v, bytes) else str(v)
            for k, v in response.information.items()
        }
    return fields


def frame_result(frame):
    """The printed fields of a raw answer frame."""
    function = frame[7] if len(frame) > 7 else None
    fields = {"frame": frame.hex(), "transaction_id": struct.unpack(">H", frame[:2])[0]}
    if function is not None and function & 0x80:
        code = frame[8] if len(frame) > 8 else None
        fields.update(result="exception", isError=True, function_code=function,
                      exception_code=code)
    else:
        fields.update(result="ok", isError=False, function_code=function,
                      data=frame[8:].hex())
    return fields


def run_step(session, name, args):
    c = session.client
    if name == "sleep":
        time.sleep(args[0])
        session.check_open()
        return {"result": "ok"}
    if name in ("read_coils", "read_discrete", "read_holding", "read_input"):
        method = {
            "read_coils": c.read_coils,
            "read_discrete": c.read_discrete_inputs,
            "read_holding": c.read_holding_registers,
            "read_input": c.read_input_registers,
        }[name]
        return pdu_result(session.call(method, args[0], count=args[1]), args[1])
    if name == "write_coil":
        return pdu_result(session.call(c.write_coil, args[0], args[1]))
    if name == "write_register":
        return pdu_result(session.call(c.write_register, args[0], args[1]))
    if name == "write_coils":
        return pdu_result(session.call(c.write_coils, args[0], args[1]))
    if name == "write_registers":
        return pdu_result(session.call(c.write_registers, args[0], args[1]))
    if name == "diagnostics":
        return pdu_result(session.call(c.diag_read_diagnostic_register))
    if name == "device_info":
        return pdu_result(session.call(c.read_device_information, read_code=1))
    if name == "raw":
        if not 0 < args[0] < 0x80:
            raise UsageError(f"raw: function code {args[0]} is not 1..127")
        return frame_result(session.raw(args[0], args[1] if len(args) > 1 else b""))
    if name == "send":
        return frame_result(session.exchange(args[0]))
    raise UsageError(f"unknown step {name!r}")


def describe(name, args):
    """The step as it would be written on the command line."""

    def word(arg):
        if isinstance(arg, bytes):
            return arg.hex()
        if isinstance(arg, bool):
            return str(int(arg))
        if isinstance(arg, list):
            return ",".join(word(a) for a in arg)
        return str(arg)

    return " ".join([name] + [word(a) for a in args])


def run_sequence(host, port, unit, timeout, steps, repeat):
    """Runs the steps `repeat` times; returns the exit status."""
    number = 0
    for _ in range(repeat):
        try:
            session = Session(host, port, unit, timeout)
        except TransportFailure as failure:
            emit({"step": number + 1, "op": "connect", "session": None,
                  "result": failure.kind, "error": failure.detail})
            return 1
        try:
            for name, args in steps:
                number += 1
                line = {"step": number, "op": describe(name, args),
                        "session": session.local_port}
                try:
                    line.update(run_step(session, name, args))
                except TransportFailure as failure:
                    line.update(result=failure.kind, error=failure.detail)
                    emit(line)
                    return 1
                emit(line)
        finally:
            session.close()
    return 0


def emit(line):
    print(json.dumps(line), flush=True)


async def one_concurrent_session(host, port, unit, timeout, index, barrier):
    """Connect, wait for all, then read, write, read back; returns an outcome name."""
    client = AsyncModbusTcpClient(host, port=port, timeout=timeout, retries=0,
                                  reconnect_delay=0)
    try:
        try:
            connected = await client.connect()
        except OSError:
            connected = False
        await barrier.wait()
        if not connected:
            return "refused", "connect failed"
        address = index % 200
        value = 10000 + index
        first = await client.read_holding_registers(address, count=1, device_id=unit)
        if first.isError():
            return "exception", f"read: exception {first.exception_code}"
        written = await client.write_register(address, value, device_id=unit)
        if written.isError():
            return "exception", f"write: exception {written.exception_code}"
        again = await client.read_holding_registers(address, count=1, device_id=unit)
        if again.isError():
            return "exception", f"read back: exception {again.exception_code}"
        # Sessions share an address only beyond 200; there a neighbour may have written.
        return "succeeded", None
    except asyncio.TimeoutError:
        return "timeout", "no answer"
    except (ModbusException, OSError) as error:
        return "closed", str(error)
    finally:
        client.close()


async def run_concurrent(host, port, unit, timeout, sessions):
    barrier = asyncio.Barrier(sessions)
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(one_concurrent_session(host, port, unit, timeout, i, barrier)
          for i in range(sessions))
    )
    summary = {"mode": "concurrent", "sessions": sessions, "seconds":
               round(time.monotonic() - started, 3)}
    for kind in ("succeeded", "exceptions", "closed", "refused", "timeout"):
        summary[kind] = 0
    errors = []
    for kind, detail in outcomes:
        summary["exceptions" if kind == "exception" else kind] += 1
        if detail and len(errors) < 5:
            errors.append(detail)
    summary["errors"] = errors
    emit(summary)
    transport = summary["closed"] + summary["refused"] + summary["timeout"]
    return 1 if transport else 0


def positive(option, text):
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{option} needs a whole number >= 1, got {text!r}")
    return int(text)


def main(argv):
    unit, timeout, repeat, concurrent, json_steps = 1, 5.0, 1, None, None
    words = list(argv)
    positional = []
    while words:
        word = words.pop(0)
        if word in ("-h", "--help"):
            print(USAGE)
            return 0
        if word in ("--unit", "--timeout", "--repeat", "--concurrent", "--json"):
            if not words:
                raise UsageError(f"{word} needs a value")
            value = words.pop(0)
            if word == "--unit":
                if not value.isdigit() or int(value) > 255:
                    raise UsageError(f"--unit needs 0..255, got {value!r}")
                unit = int(value)
            elif word == "--timeout":
                timeout = parse_value("float", value)
                if timeout == 0:
                    raise UsageError("--timeout must be above 0")
            elif word == "--repeat":
                repeat = positive(word, value)
            elif word == "--concurrent":
                concurrent = positive(word, value)
            else:
                json_steps = sys.stdin.read() if value == "-" else value
        else:
            positional.append(word)
    if not positional:
        raise UsageError("HOST:PORT is missing")
    host, port = parse_endpoint(positional[0])
    tokens = positional[1:]
    if concurrent is not None:
        if tokens or json_steps is not None:
            raise UsageError("--concurrent takes no steps")
        return asyncio.run(run_concurrent(host, port, unit, timeout, concurrent))
    if json_steps is not None:
        if tokens:
            raise UsageError("steps come either as words or --json, not both")
        steps = parse_json_steps(json_steps)
    else:
        steps = parse_steps(tokens)
    if not steps:
        raise UsageError("no steps given")
    return run_sequence(host, port, unit, timeout, steps, repeat)


if __name__ == "__main__":
    # pymodbus logs lost connections as errors; the JSON lines already say what happened.
    logging.basicConfig(level=logging.CRITICAL, stream=sys.stderr)
    try:
        sys.exit(main(sys.argv[1:]))
    except UsageError as error:
        print(f"modbus_scada.py: {error}\n{USAGE}", file=sys.stderr)
        sys.exit(64)
    except KeyboardInterrupt:
        sys.exit(130)
