"""List the names TensorRT's Python bindings define, from the official binding wheels, for an offline API test.

    python tools/scripts/trt_api_names.py                       # 10.11.0.33 and 11.4.0.106 into tests/data/
    python tools/scripts/trt_api_names.py --version 11.5.0.1    # another release

The wheels (``tensorrt-cu12-bindings`` on PyPI) hold the compiled module but not NVIDIA's libraries, so the module
cannot be imported without a GPU install. Every attribute, method, enum value and keyword a pybind11 module
registers is a C string literal in the module's ``.rodata`` section, so this reads that section (a small ELF64
reader: no binutils needed), keeps the strings that are Python identifiers and writes them sorted, one a line,
after a header naming the wheel: ``tests/data/tensorrt-<version>-names.txt``.

Two things a reader of the list must know (tests/deploy/test_trt_api.py handles both):
* the linker stores a string that ends another one only once ("INT8" lives inside "UINT8"), so a name is
  present when it equals, or ends, an identifier of the list;
* the names carry no scope: "FP16" being present does not say which enum holds it. Removed APIs whose names
  survive elsewhere are checked by name pattern in the test, not through this list.
"""

from __future__ import annotations

import argparse
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSIONS = ("10.11.0.33", "11.4.0.106")
PACKAGE = "tensorrt-cu12-bindings"
OUT = Path(__file__).resolve().parents[2] / "tests" / "data"
_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_MODULE = re.compile(r"tensorrt[^/]*/tensorrt(\.[^/]*)?\.so$")


def section(elf: bytes, name: str) -> bytes:
    """The bytes of section ``name`` of a little-endian ELF64 file."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx]
    for header in headers:
        start = names[4] + header[0]
        if elf[start:elf.index(b"\0", start)].decode() == name:
            return elf[header[4]:header[4] + header[5]]
    raise ValueError(f"no {name} section")


def names_in(module: bytes) -> list[str]:
    """Sorted identifier strings of the module's read-only data."""
    strings = section(module, ".rodata").split(b"\0")
    return sorted({s.decode() for s in strings if _IDENTIFIER.fullmatch(s)})


def wheel_module(wheel: Path) -> bytes:
    """The compiled ``tensorrt`` module inside a binding wheel."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if _MODULE.search(m)]
        if len(members) != 1:
            raise ValueError(f"{wheel.name}: expected one compiled tensorrt module, found {members}")
        return archive.read(members[0])


def download(version: str, directory: Path, python_version: str | None) -> Path:
    """The binding wheel of ``version`` for this (or the given) Python, from the package index pip uses."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(directory),
               f"{PACKAGE}=={version}"]
    if python_version:
        command += ["--python-version", python_version, "--platform", "manylinux_2_28_x86_64"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wheels = sorted(directory.glob(f"{PACKAGE.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip saved no {PACKAGE} {version} wheel in {directory}")
    return wheels[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="append", help=f"binding release (repeatable; default {VERSIONS})")
    parser.add_argument("--python-version", default=None, help="wheel Python tag to fetch, e.g. 3.11")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.version or VERSIONS:
            wheel = download(version, Path(tmp), args.python_version)
            names = names_in(wheel_module(wheel))
            path = args.out / f"tensorrt-{version}-names.txt"
            header = f"# {PACKAGE}=={version} ({wheel.name}): identifier strings of the module's .rodata\n"
            path.write_text(header + "\n".join(names) + "\n")
            print(f"{path}: {len(names)} names")


if __name__ == "__main__":
    main()
