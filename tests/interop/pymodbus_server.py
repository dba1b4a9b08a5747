#!/usr/bin/env python3
"""A Modbus TCP server we did not write, for calwatch's interop tests.

pymodbus (Debian's python3-pymodbus 3.0) serves the calwatch test pattern for a profile of
kind "other" (config/profiles/test-all-types.toml): every value holds its type's constant,
encoded here with pymodbus's own BinaryPayloadBuilder in the value's word order, never
with calwatch's code. The agent then polls this server and must read back the pattern.

    pymodbus_server.py --profile PROFILE [--host 127.0.0.1] [--port 0] [--serial PYM00001]

Prints "pymodbus serving on HOST:PORT" once it listens (port 0 picks a free one).
"""

import argparse
import asyncio
import sys
import tomllib

from pymodbus.constants import Endian
from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.payload import BinaryPayloadBuilder
from pymodbus.server import StartAsyncTcpServer

# The calwatch test pattern: raw register content per type (agent/src/simulate/model.rs
# says the same in Rust; this file must not import it).
PATTERN = {
    "u16": 51234,
    "i16": -12345,
    "u32": 0xA1B2C3D4,
    "i32": -0x1A2B3C4D,
    "u64": 0x0012_3456_789A_BCDE,
    "i64": -0x0012_3456_789A_BCDE,
    "f32": 12345.678,
    "f64": -299792.458,
}

# calwatch's order names as (byte order within a word, word order): ABCD is big-endian
# throughout, CDAB swaps the words, BADC the bytes in each word, DCBA both.
ORDERS = {
    "ABCD": (Endian.Big, Endian.Big),
    "CDAB": (Endian.Big, Endian.Little),
    "BADC": (Endian.Little, Endian.Big),
    "DCBA": (Endian.Little, Endian.Little),
}

ADD = {
    "u16": "add_16bit_uint",
    "i16": "add_16bit_int",
    "u32": "add_32bit_uint",
    "i32": "add_32bit_int",
    "u64": "add_64bit_uint",
    "i64": "add_64bit_int",
    "f32": "add_32bit_float",
    "f64": "add_64bit_float",
}


def registers(value, model, serial):
    """The registers of one profile value, as pymodbus builds them."""
    ty = value["type"]
    if ty == "string":
        n = value["registers"]
        text = {"model": model, "serial": serial}.get(value["name"], "CALWATCH")
        raw = text.encode("ascii")[: 2 * n].ljust(2 * n, b"\0")
        builder = BinaryPayloadBuilder(byteorder=Endian.Big, wordorder=Endian.Big)
        builder.add_string(raw)
        return builder.to_registers()
    # 16-bit types have no word order; calwatch reads them big-endian.
    byteorder, wordorder = ORDERS[value.get("order", "ABCD")] if ty not in ("u16", "i16") else (Endian.Big, Endian.Big)
    builder = BinaryPayloadBuilder(byteorder=byteorder, wordorder=wordorder)
    getattr(builder, ADD[ty])(PATTERN[ty])
    return builder.to_registers()


def images(profile, serial):
    """Address -> content maps of the four tables."""
    tables = {"coil": {}, "discrete": {}, "holding": {}, "input": {}}
    for value in profile["value"]:
        image = tables[value["table"]]
        on = not value["name"].endswith("_off")
        raw_on = on != value.get("invert", False)
        address = value["address"]
        if value["type"] == "bool":
            image[address] = raw_on
        elif value["type"] == "bit":
            image[address] = image.get(address, 0) | (int(raw_on) << value["bit"])
        else:
            for i, word in enumerate(registers(value, profile["model"], serial)):
                image[address + i] = word
    return tables


def block(image, fill):
    size = max(image, default=0) + 1
    return ModbusSequentialDataBlock(0, [image.get(a, fill) for a in range(size)])


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--serial", default="PYM00001")
    args = parser.parse_args()
    with open(args.profile, "rb") as f:
        profile = tomllib.load(f)
    if profile.get("kind") != "other":
        sys.exit(f"{args.profile}: the test pattern needs a profile of kind other")
    t = images(profile, args.serial)
    slave = ModbusSlaveContext(
        co=block(t["coil"], False),
        di=block(t["discrete"], False),
        hr=block(t["holding"], 0),
        ir=block(t["input"], 0),
        zero_mode=True,  # request address N is data block address N
    )
    context = ModbusServerContext(slaves=slave, single=True)
    server = await StartAsyncTcpServer(
        context=context, address=(args.host, args.port), defer_start=True
    )
    task = asyncio.create_task(server.serve_forever())
    await server.serving
    port = server.server.sockets[0].getsockname()[1]
    print(f"pymodbus serving on {args.host}:{port}", flush=True)
    await task


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
