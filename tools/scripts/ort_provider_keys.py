"""Read the provider option keys that ONNX Runtime's GPU wheel accepts for its CUDA and TensorRT providers, from the
wheel's own binaries, into tests/data/ort_provider_keys.json (the table tests/deploy/test_deploy_profile.py checks
every key the code passes against).

    pip download --no-deps onnxruntime-gpu==1.26.0 -d /tmp/ortgpu
    python tools/scripts/ort_provider_keys.py /tmp/ortgpu/onnxruntime_gpu-1.26.0-*.whl

Where the keys live:

* TensorRT: the Python binding (``onnxruntime_pybind11_state*.so``) parses the TensorRT options by hand, comparing
  each key with a literal and throwing ``Invalid TensorRT EP option`` for any other.
* CUDA: the binding hands the options to the CUDA provider library (``libonnxruntime_providers_cuda.so``), whose
  option parser registers one literal per key and fails with ``Unknown provider option`` for any other.

The compiler stores those literals together in ``.rodata``: a run of ``snake_case`` names next to the provider's
error message. The linker may fold a key into the tail of a longer string (``device_id`` inside
``set_cuda_device_id``, ``user_compute_stream`` inside ``has_user_compute_stream``), so the run alone misses some.
The code does not: the tool finds the instructions that load the run's strings (x86-64 RIP-relative ``lea``),
takes the stretch of code around the one that loads a known key where such loads follow each other (at most
``_GAP`` bytes apart, and as far again on either side: the first comparison may load a folded key), and reads every
``snake_case`` string that stretch loads, folded ones included.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "ort_provider_keys.json"
_KEY = re.compile(rb"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")  # snake_case with at least one underscore: option keys
# provider -> (library in the wheel, a key its table holds, the message the parser gives any other key)
PROVIDERS = {
    "TensorrtExecutionProvider": ("onnxruntime_pybind11_state", b"trt_fp16_enable", b"Invalid TensorRT EP option"),
    "CUDAExecutionProvider": ("libonnxruntime_providers_cuda", b"enable_cuda_graph", b"Unknown provider option"),
}
_GAP = 0x800  # bytes of code between two comparisons of one table, at most


class Elf:
    """The sections of an x86-64 ELF shared library that the search needs (.text and .rodata)."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF" or data[4] != 2 or struct.unpack_from("<H", data, 18)[0] != 62:
            raise ValueError("not an x86-64 ELF file")
        self.data = data
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names_at = headers[shstrndx][4]
        self.sections = {}
        for name, _, _, addr, offset, size in headers:
            end = data.index(b"\0", names_at + name)
            self.sections[data[names_at + name:end].decode()] = (addr, offset, size)

    def string_at(self, address: int) -> bytes | None:
        """The C string at a virtual address inside .rodata, or None."""
        addr, offset, size = self.sections[".rodata"]
        if not addr <= address < addr + size:
            return None
        start = offset + address - addr
        return self.data[start:self.data.index(b"\0", start)]

    def rodata_address(self, text: bytes) -> int:
        """Virtual address of the string ``text`` (a whole C string) in .rodata."""
        addr, offset, size = self.sections[".rodata"]
        blob = self.data[offset:offset + size]
        at = blob.find(b"\0" + text + b"\0")
        if at < 0:
            raise LookupError(f"{text!r} is not a string of this library")
        return addr + at + 1

    def loads(self) -> tuple[np.ndarray, np.ndarray]:
        """(instruction address, target address) of every RIP-relative ``lea r64, [rip + disp32]`` in .text."""
        addr, offset, size = self.sections[".text"]
        code = np.frombuffer(self.data, np.uint8, size, offset)
        at = np.flatnonzero(((code[:-6] & 0xFB) == 0x48) & (code[1:-5] == 0x8D) & ((code[2:-4] & 0xC7) == 0x05))
        disp = code[at[:, None] + 3 + np.arange(4)].astype(np.int64) @ (256 ** np.arange(4))
        disp = np.where(disp >= 2**31, disp - 2**32, disp)
        return addr + at, addr + at + 7 + disp


def rodata_run(elf: Elf, member: bytes, message: bytes) -> list[bytes]:
    """The snake_case strings stored around ``member`` up to the parser's error ``message`` (either side)."""
    _, offset, size = elf.sections[".rodata"]
    blob = elf.data[offset:offset + size]
    at = blob.find(b"\0" + member + b"\0") + 1
    start, end = blob.rfind(message, 0, at), blob.find(message, at)
    lo, hi = (start, at + 4096) if start >= 0 and (end < 0 or at - start < end - at) else (at - 4096, end)
    return [s for s in blob[lo:hi].split(b"\0") if _KEY.fullmatch(s)]


def table(elf: Elf, member: bytes, message: bytes) -> list[str]:
    """The provider's option keys: every snake_case string loaded by the code that loads the .rodata run's keys."""
    sites, targets = elf.loads()
    run = {elf.rodata_address(s) for s in rodata_run(elf, member, message)}
    anchor = sites[targets == elf.rodata_address(member)]
    if not len(anchor):
        raise LookupError(f"no code loads {member!r}")
    near = np.sort(sites[np.isin(targets, list(run))])
    first = last = int(np.searchsorted(near, anchor[0]))
    while first > 0 and near[first] - near[first - 1] <= _GAP:
        first -= 1
    while last + 1 < len(near) and near[last + 1] - near[last] <= _GAP:
        last += 1
    region = (sites >= near[first] - _GAP) & (sites <= near[last] + _GAP)
    keys = {elf.string_at(int(t)) for t in targets[region]}
    return sorted(k.decode() for k in keys if k is not None and _KEY.fullmatch(k))


def extract(wheel: Path) -> dict[str, object]:
    """Both tables from one onnxruntime-gpu wheel."""
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
        result: dict[str, object] = {"wheel": wheel.name}
        for provider, (library, member, message) in PROVIDERS.items():
            name = next(m for m in members if Path(m).name.startswith(library) and m.endswith(".so"))
            result[provider] = table(Elf(archive.read(name)), member, message)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="an onnxruntime-gpu wheel (manylinux x86-64)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    tables = extract(args.wheel)
    args.out.write_text(json.dumps(tables, indent=1) + "\n")
    for provider in PROVIDERS:
        print(f"{provider}: {len(tables[provider])} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
