"""The gdb stub: the protocol layer against a fake target, then real gdb against a real guest."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmpy.debug.gdblisten import parse_gdb_spec
from kvmpy.debug.gdbproto import (
    SIGSEGV,
    SIGTRAP,
    Ack,
    BadPacket,
    Exited,
    GdbSession,
    Interrupt,
    Packet,
    PacketDecoder,
    RegisterLayout,
    Status,
    Stop,
    TargetError,
    checksum,
    escape,
    frame,
    unescape,
)
from kvmpy.debug.gdbstub import GdbStub, attach_gdb
from kvmpy.debug.hostprobe import DebugSupport, probe_debug_support
from kvmpy.debug.trace import CompositeObserver, ExitStats
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.x86.debugregs import DebugRegisters, split_watch
from kvmpy.x86.gdb_registers import AMD64, I386
from kvmpy.x86.gdb_registers import abridged_tag as _abridged_tag
from kvmpy.x86.gdb_registers import full_tag_word as _full_tag_word
from kvmpy.x86.modes import default_load_addr
from kvmpy.x86.registers import Fpu
from tests.helpers import ROOT, Assembler, guest, host_kvm_module

# -- framing ------------------------------------------------------------------------------


def test_checksum_and_frame() -> None:
    assert checksum(b"OK") == 0x9A
    assert frame("OK") == b"$OK#9a"
    assert frame(b"") == b"$#00"
    assert frame("m100000,4") == b"$m100000,4#" + f"{checksum(b'm100000,4'):02x}".encode()


def test_escape_round_trip() -> None:
    data = bytes(range(256))
    escaped = escape(data)
    for special in b"$#*":
        assert special not in escaped
    assert escape(b"a}b") == b"a}]b"
    assert escape(b"#$*") == b"}\x03}\x04}\x0a"
    assert unescape(escaped) == data
    with pytest.raises(ValueError):
        unescape(b"ab}")


def test_decoder_packets_acks_and_interrupts() -> None:
    decoder = PacketDecoder()
    events = decoder.feed(b"+$qSupported#37-\x03")
    assert events == [Ack(True), Packet(b"qSupported"), Ack(False), Interrupt()]


def test_decoder_keeps_partial_packets() -> None:
    decoder = PacketDecoder()
    packet = frame("m1000,10")
    assert decoder.feed(packet[:3]) == []
    assert decoder.feed(packet[3:-1]) == []
    assert decoder.feed(packet[-1:]) == [Packet(b"m1000,10")]


def test_decoder_bad_checksum_noise_and_restart() -> None:
    decoder = PacketDecoder()
    assert decoder.feed(b"$g#00") == [BadPacket(b"g")]
    assert decoder.feed(b"$g#zz") == [BadPacket(b"g")]
    # Noise between packets is dropped; a '$' inside a packet starts over.
    assert decoder.feed(b"garbage$half$g#67") == [Packet(b"g")]
    # A 0x03 inside a packet is data, not an interrupt.
    assert decoder.feed(frame(b"X0,1:\x03")) == [Packet(b"X0,1:\x03")]


def test_decoder_drops_runaway_packets() -> None:
    decoder = PacketDecoder(max_size=8)
    assert decoder.feed(b"$" + b"a" * 20) == []
    assert decoder.feed(b"$g#67") == [Packet(b"g")]


# -- register layouts and target descriptions ---------------------------------------------


def _xml_registers(layout: RegisterLayout) -> tuple[str, list[tuple[str, int, int]]]:
    root = ET.fromstring(layout.target_xml().split("\n", 2)[2])  # past <?xml> and DOCTYPE
    arch = root.findtext("architecture") or ""
    regs = [
        (reg.get("name", ""), int(reg.get("bitsize", "0")), int(reg.get("regnum", "-1")))
        for reg in root.iter("reg")
    ]
    return arch, regs


def test_amd64_target_description() -> None:
    arch, regs = _xml_registers(AMD64)
    assert arch == "i386:x86-64"
    names = [name for name, _, _ in regs]
    assert names[:24] == [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    ]  # fmt: skip
    assert names[24:32] == [f"st{i}" for i in range(8)]
    assert names[32:40] == ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    assert names[40:57] == [*(f"xmm{i}" for i in range(16)), "mxcsr"]
    assert {"fs_base", "gs_base", "cr3", "efer"} <= set(names)
    assert [regnum for _, _, regnum in regs] == list(range(len(regs)))
    sizes = dict((name, bits) for name, bits, _ in regs)
    assert (sizes["rax"], sizes["rip"], sizes["eflags"], sizes["cs"]) == (64, 64, 32, 32)
    assert (sizes["st0"], sizes["xmm0"]) == (80, 128)
    features = re.findall(r'<feature name="([^"]+)"', AMD64.target_xml())
    assert features[:2] == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"]


def test_i386_target_description() -> None:
    arch, regs = _xml_registers(I386)
    assert arch == "i386"
    names = [name for name, _, _ in regs]
    assert names[:16] == [
        "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi",
        "eip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    ]  # fmt: skip
    assert [f"xmm{i}" for i in range(8)] == [n for n in names if n.startswith("xmm")]
    assert all(bits == 32 for name, bits, _ in regs[:16])


def test_layout_encode_decode() -> None:
    values = {name: i + 1 for i, name in enumerate(AMD64.names)}
    text = AMD64.encode(values)
    assert len(text) == 2 * sum(reg.size for reg in AMD64.registers)
    assert text.startswith("0100000000000000" + "0200000000000000")
    assert AMD64.decode(text) == values
    # Registers the target did not give are "unavailable": xx.
    partial = AMD64.encode({"rax": 0x1122})
    assert partial.startswith("2211000000000000" + "xx" * 8)
    assert AMD64.decode(partial) == {"rax": 0x1122}
    with pytest.raises(ValueError):
        AMD64.decode(text + "00")
    with pytest.raises(ValueError):
        AMD64.decode(text[:5])


# -- the session against a fake target ---------------------------------------------------


@dataclass
class FakeTarget:
    layout_: RegisterLayout = AMD64
    thread_ids: list[int] = field(default_factory=lambda: [1, 2])
    registers: dict[int, dict[str, int]] = field(default_factory=dict)
    memory: dict[int, int] = field(default_factory=dict)
    breakpoints: set[tuple[int, int, int]] = field(default_factory=set)
    resumed: list[dict[int, str]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    last: Status = field(default_factory=lambda: Stop(SIGTRAP, 1))

    def layout(self) -> RegisterLayout:
        return self.layout_

    def threads(self) -> list[int]:
        return self.thread_ids

    def read_registers(self, thread: int) -> dict[str, int]:
        return dict(self.registers.get(thread, {"rip": 0x1000 * thread, "rax": thread}))

    def write_registers(self, thread: int, values: dict[str, int]) -> None:
        self.registers.setdefault(thread, {}).update(values)

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        out = bytearray()
        for at in range(address, address + length):
            if at not in self.memory:
                break
            out.append(self.memory[at])
        return bytes(out)

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        if address not in self.memory:
            raise TargetError("unmapped", "E0e")
        for i, byte in enumerate(data):
            self.memory[address + i] = byte

    def insert_breakpoint(self, kind: int, address: int, length: int) -> None:
        if len(self.breakpoints) >= 4:
            raise TargetError("full", "E1c")
        self.breakpoints.add((kind, address, length))

    def remove_breakpoint(self, kind: int, address: int, length: int) -> None:
        self.breakpoints.discard((kind, address, length))

    def resume(self, actions: dict[int, str]) -> None:
        self.resumed.append(actions)

    def interrupt(self) -> None:
        self.calls.append("interrupt")

    def status(self) -> Status:
        return self.last

    def kill(self) -> None:
        self.calls.append("kill")

    def detach(self) -> None:
        self.calls.append("detach")


def session_with(target: FakeTarget | None = None) -> tuple[GdbSession, FakeTarget]:
    target = target or FakeTarget()
    return GdbSession(target), target


def test_qsupported_and_no_ack_mode() -> None:
    session, _ = session_with()
    reply = session.handle(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
    assert reply is not None
    features = reply.split(";")
    assert "PacketSize=4000" in features
    assert {"qXfer:features:read+", "QStartNoAckMode+", "swbreak+", "hwbreak+"} <= set(features)
    assert session.gdb_features == {"multiprocess", "swbreak", "hwbreak"}
    assert not session.no_ack
    assert session.handle(b"QStartNoAckMode") == "OK"
    assert session.no_ack


def test_unknown_and_empty_packets_get_empty_replies() -> None:
    session, _ = session_with()
    for packet in (b"vMustReplyEmpty", b"qTStatus", b"qOffsets", b"!", b"R00", b"Qfoo", b"x"):
        assert session.handle(packet) == "", packet


def test_qxfer_target_xml_in_chunks() -> None:
    session, _ = session_with()
    document = ""
    offset = 0
    while True:
        reply = session.handle(f"qXfer:features:read:target.xml:{offset:x},100".encode())
        assert reply is not None and reply[0] in "ml"
        chunk = unescape(reply[1:].encode("latin-1")).decode()
        document += chunk
        offset += len(chunk)
        if reply[0] == "l":
            break
    assert document == AMD64.target_xml()
    assert session.handle(b"qXfer:features:read:other.xml:0,100") == "E01"
    assert session.handle(b"qXfer:memory-map:read::0,100") == ""


def test_stop_status_and_threads() -> None:
    session, target = session_with()
    assert session.handle(b"?") == "T05thread:1;"
    assert session.handle(b"qfThreadInfo") == "m1,2"
    assert session.handle(b"qsThreadInfo") == "l"
    assert session.handle(b"qC") == "QC1"
    assert session.handle(b"qAttached") == "1"
    assert session.handle(b"qAttached:1") == "1"
    assert session.handle(b"T2") == "OK"
    assert session.handle(b"T3") == "E03"
    assert session.handle(b"Hg2") == "OK"
    assert session.handle(b"Hg5") == "E03"
    assert session.handle(b"Hc-1") == "OK"
    assert session.handle(b"Hg0") == "OK"
    assert session.handle(b"qThreadExtraInfo,2") == b"vCPU 1".hex()
    assert session.handle(b"qSymbol::") == "OK"
    target.last = Exited(0)
    assert session.handle(b"?") == "W00"
    target.last = Exited(signal=SIGSEGV)
    assert session.handle(b"?") == "X0b"


def test_stop_replies() -> None:
    session, _ = session_with()
    assert session.stop_reply(Stop(SIGTRAP, 2)) == "T05thread:2;"
    assert session.current_thread == 2
    # swbreak/hwbreak only for a gdb that said it understands them.
    assert session.stop_reply(Stop(SIGTRAP, 1, "swbreak")) == "T05thread:1;"
    session.handle(b"qSupported:swbreak+;hwbreak+")
    assert session.stop_reply(Stop(SIGTRAP, 1, "swbreak")) == "T05thread:1;swbreak:;"
    assert session.stop_reply(Stop(SIGTRAP, 1, "hwbreak")) == "T05thread:1;hwbreak:;"
    assert session.stop_reply(Stop(SIGTRAP, 1, "watch", 0x1000A8)) == "T05thread:1;watch:1000a8;"
    assert session.stop_reply(Stop(SIGTRAP, 1, "awatch", 0x10)) == "T05thread:1;awatch:10;"
    assert session.stop_reply(Exited(code=0x101)) == "W01"


def test_registers_g_and_p_follow_the_selected_thread() -> None:
    session, target = session_with()
    target.registers = {1: {"rax": 1, "rip": 0x100000}, 2: {"rax": 2, "rip": 0x200000}}
    reply = session.handle(b"g")
    assert reply is not None and reply.startswith("0100000000000000" + "xx" * 8)
    assert session.handle(b"Hg2") == "OK"
    assert session.handle(b"g") == AMD64.encode(target.registers[2])
    rip = AMD64.names.index("rip")
    assert session.handle(f"p{rip:x}".encode()) == "0000200000000000"
    assert session.handle(b"p3") == "xx" * 8
    assert session.handle(b"p1000") == "E16"


def test_registers_G_and_P_write() -> None:
    session, target = session_with()
    values = {name: 0 for name in AMD64.names}
    values.update(rax=0x1234, rip=0x100010)
    assert session.handle(b"G" + AMD64.encode(values).encode()) == "OK"
    assert target.registers[1]["rax"] == 0x1234
    assert target.registers[1]["rip"] == 0x100010
    eflags = AMD64.names.index("eflags")
    assert session.handle(f"P{eflags:x}=46020000".encode()) == "OK"
    assert target.registers[1]["eflags"] == 0x246
    assert session.handle(f"P{eflags:x}=4602".encode()) == "E16"
    assert session.handle(b"Gzz") == "E16"


def test_memory_read_and_write() -> None:
    session, target = session_with()
    target.memory = {0x1000 + i: i for i in range(8)}
    assert session.handle(b"m1000,4") == "00010203"
    assert session.handle(b"m1006,4") == "0607"  # a short read stops at the hole
    assert session.handle(b"m2000,4") == "E0e"
    assert session.handle(b"m1000,0") == ""
    assert session.handle(b"M1000,2:aabb") == "OK"
    assert target.memory[0x1000] == 0xAA and target.memory[0x1001] == 0xBB
    assert session.handle(b"M1000,3:aabb") == "E16"
    assert session.handle(b"M2000,1:00") == "E0e"
    assert session.handle(b"mzz,4") == "E16"


def test_binary_memory_write_unescapes() -> None:
    session, target = session_with()
    target.memory = {0x1000 + i: 0 for i in range(8)}
    data = b"#$}*\x03"
    assert session.handle(b"X1000,5:" + escape(data)) == "OK"
    assert bytes(target.memory[0x1000 + i] for i in range(5)) == data
    assert session.handle(b"X1000,0:") == "OK"  # gdb's probe for X
    assert session.handle(b"X1000,2:a") == "E16"
    assert session.handle(b"X2000,1:a") == "E0e"


def test_continue_step_and_vcont() -> None:
    session, target = session_with()
    assert session.handle(b"vCont?") == "vCont;c;C;s;S"
    assert session.handle(b"c") is None and session.running
    assert target.resumed[-1] == {1: "c", 2: "c"}
    assert session.stopped(Stop(SIGTRAP, 2)) == "T05thread:2;"
    assert not session.running
    assert session.handle(b"s") is None
    assert target.resumed[-1] == {2: "s"}  # the thread that stopped
    session.stopped(Stop(SIGTRAP, 2))
    assert session.handle(b"vCont;s:1;c") is None
    assert target.resumed[-1] == {1: "s", 2: "c"}
    session.stopped(Stop(SIGTRAP, 1))
    assert session.handle(b"vCont;c") is None
    assert target.resumed[-1] == {1: "c", 2: "c"}
    session.stopped(Stop(SIGTRAP, 1))
    assert session.handle(b"vCont;s:2") is None
    assert target.resumed[-1] == {2: "s"}
    session.stopped(Stop(SIGTRAP, 1))
    assert session.handle(b"vCont;C0b:1;c") is None
    assert target.resumed[-1] == {1: "c", 2: "c"}
    session.stopped(Stop(SIGTRAP, 1))
    assert session.handle(b"vCont;r1000,2000:1") == ""  # range stepping: not offered
    assert session.handle(b"vCont;c:9") == "E03"


def test_continue_at_an_address_sets_the_pc() -> None:
    session, target = session_with()
    assert session.handle(b"c100020") is None
    assert target.registers[1]["rip"] == 0x100020
    session.stopped(Stop(SIGTRAP, 1))
    assert session.handle(b"S05;100030") is None
    assert target.registers[1]["rip"] == 0x100030


def test_breakpoint_packets() -> None:
    session, target = session_with()
    assert session.handle(b"Z0,100011,1") == "OK"
    assert session.handle(b"Z1,100042,1") == "OK"
    assert session.handle(b"Z2,1000a8,8") == "OK"
    assert session.handle(b"Z4,1000b0,4;X1,0") == "OK"  # conditions are ignored
    assert target.breakpoints == {
        (0, 0x100011, 1),
        (1, 0x100042, 1),
        (2, 0x1000A8, 8),
        (4, 0x1000B0, 4),
    }
    assert session.handle(b"Z3,1000c0,4") == "E1c"
    assert session.handle(b"z2,1000a8,8") == "OK"
    assert (2, 0x1000A8, 8) not in target.breakpoints
    assert session.handle(b"Z9,0,1") == ""
    assert session.handle(b"Z1,zz,1") == "E16"


def test_detach_and_kill() -> None:
    session, target = session_with()
    assert session.handle(b"D") == "OK"
    assert session.closing and target.calls == ["detach"]
    session, target = session_with()
    assert session.handle(b"k") is None
    assert session.closing and target.calls == ["kill"]
    session, target = session_with()
    assert session.handle(b"vKill;1") == "OK"
    assert target.calls == ["kill"]


def test_i386_session_uses_the_i386_layout() -> None:
    session, target = session_with(FakeTarget(layout_=I386))
    target.registers = {1: {"eax": 0x11, "eip": 0x7C00}}
    reply = session.handle(b"g")
    assert reply is not None
    assert reply.startswith("11000000" + "xxxxxxxx" * 7 + "007c0000")
    assert session.handle(b"c7c10") is None
    assert target.registers[1]["eip"] == 0x7C10


# -- stub pieces that need no KVM -----------------------------------------------------------


def test_parse_gdb_spec() -> None:
    assert parse_gdb_spec("tcp::1234") == ("127.0.0.1", 1234)
    assert parse_gdb_spec(":1234") == ("127.0.0.1", 1234)
    assert parse_gdb_spec("1234") == ("127.0.0.1", 1234)
    assert parse_gdb_spec("tcp:0.0.0.0:1234") == ("0.0.0.0", 1234)
    assert parse_gdb_spec("tcp:[::1]:1234") == ("::1", 1234)
    for bad in ("tcp::", "tcp::port", "tcp::70000"):
        with pytest.raises(ValueError):
            parse_gdb_spec(bad)


def test_split_watch_into_aligned_pieces() -> None:
    assert split_watch(0x1000, 8, allow_8=True) == [(0x1000, 8)]
    assert split_watch(0x1000, 8, allow_8=False) == [(0x1000, 4), (0x1004, 4)]
    assert split_watch(0x1001, 4, allow_8=True) == [(0x1001, 1), (0x1002, 2), (0x1004, 1)]
    assert split_watch(0x1003, 1, allow_8=True) == [(0x1003, 1)]
    with pytest.raises(ValueError):
        split_watch(0x1000, 0, allow_8=True)


def test_debug_registers_dr7() -> None:
    dregs = DebugRegisters()
    assert not dregs.active
    assert dregs.debugreg() == [0] * 8
    dregs.insert(1, 0x100042, 1)  # execute: R/W=00, LEN=00
    dregs.insert(2, 0x1000A8, 8)  # write, 8 bytes: R/W=01, LEN=10
    dregs.insert(4, 0x2000, 2)  # access, 2 bytes: R/W=11, LEN=01
    regs = dregs.debugreg()
    assert regs[:3] == [0x100042, 0x1000A8, 0x2000]
    dr7 = regs[7]
    assert dr7 & 0xFF == 0b010101  # L0, L1, L2
    assert (dr7 >> 16) & 0xF == 0b0000
    assert (dr7 >> 20) & 0xF == 0b1001
    assert (dr7 >> 24) & 0xF == 0b0111
    assert dregs.debugreg(with_exec=False)[0] == 0
    assert dregs.has_exec_at(0x100042) and not dregs.has_exec_at(0x1000A8)
    hit = dregs.hit(0b011)  # an instruction breakpoint and a watchpoint: the watchpoint wins
    assert hit is not None and hit.kind == 2
    assert dregs.hit(0) is None
    dregs.insert(1, 0x100042, 1)  # the same again: no new slot
    with pytest.raises(TargetError) as info:
        dregs.insert(2, 0x3001, 4)  # needs three slots, one is free
    assert info.value.reply == "E1c"
    dregs.remove(2, 0x1000A8, 8)
    dregs.remove(4, 0x2000, 2)
    dregs.insert(2, 0x3001, 4)
    assert sum(slot is not None for slot in dregs.slots) == 4
    dregs.clear()
    assert not dregs.active


def test_x87_tag_words() -> None:
    one = (0x3FFF << 64 | 1 << 63).to_bytes(10, "little")  # 1.0
    fpr = bytearray(128)
    fpr[0:10] = one  # st0
    # st1 stays zero; top = 6, so st0 is physical register 6 and st1 physical 7.
    fpu = Fpu(fsw=6 << 11, ftwx=0b1100_0000, fpr=bytes(fpr))
    full = _full_tag_word(fpu)
    assert (full >> 12) & 3 == 0  # valid
    assert (full >> 14) & 3 == 1  # zero
    assert full & 0xFFF == 0xFFF  # the rest empty
    assert _abridged_tag(full) == 0b1100_0000
    assert _full_tag_word(Fpu()) == 0xFFFF


# -- against /dev/kvm ------------------------------------------------------------------------

GUEST_TIMEOUT = 60.0
GDB = shutil.which("gdb")


@pytest.fixture
def gdb_target_elf(tmp_path: Path) -> Path:
    """guests/out/gdb_target.o linked as an ELF, so gdb knows the guest's labels."""
    obj = guest("gdb_target", ".o")
    elf = tmp_path / "gdb_target.elf"
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "--oformat", "elf64-x86-64",
         "-T", str(ROOT / "guests" / "long.ld"), "-o", str(elf), str(obj)],
        check=True,
    )  # fmt: skip
    return elf


class RunningGuest:
    """A machine running in a background thread with a stub on a free port."""

    def __init__(
        self, image: Path, wait: bool, support: DebugSupport | None = None, mode: str = "long"
    ) -> None:
        self.machine = Machine(mem_size=16 << 20)
        self.machine.load(load_flat(image, default_load_addr(mode)), mode=mode)
        self.log: list[str] = []
        self.stub = GdbStub(self.machine, port=0, wait=wait, support=support, log=self.log.append)
        self.stub.start()
        self.machine.observer = self.stub
        self.outcome: Outcome | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.outcome = self.machine.run(timeout=GUEST_TIMEOUT)

    def finish(self, timeout: float = 30) -> Outcome:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the guest did not finish"
        assert self.outcome is not None
        return self.outcome

    def close(self) -> None:
        if self.thread.is_alive():
            self.machine.stop(Outcome(OutcomeKind.INTERRUPTED, "test over"))
            self.thread.join(10)
        self.stub.close()
        self.machine.close()


@pytest.fixture
def running() -> Iterator[list[RunningGuest]]:
    guests: list[RunningGuest] = []
    yield guests
    for each in guests:
        each.close()


class Client:
    """A minimal gdb: sends packets, checks acks, reads replies (all with timeouts)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.decoder = PacketDecoder()
        self.events: list[object] = []
        self.no_ack = False

    def _next(self) -> object:
        while not self.events:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("the stub closed the connection")
            self.events += self.decoder.feed(data)
        return self.events.pop(0)

    def send(self, payload: str) -> None:
        self.sock.sendall(frame(payload))
        if not self.no_ack:
            assert self._next() == Ack(True)

    def reply(self) -> str:
        event = self._next()
        assert isinstance(event, Packet), event
        if not self.no_ack:
            self.sock.sendall(b"+")
        return event.payload.decode("latin-1")

    def ask(self, payload: str) -> str:
        self.send(payload)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.kvm
def test_set_guest_debug() -> None:
    with Machine(mem_size=4 << 20, irqchip=False) as machine:
        vcpu = machine.vcpu
        vcpu.set_guest_debug(single_step=True)
        dr7 = 1 | 1 << 16 | 3 << 18
        vcpu.set_guest_debug(breakpoints=[0x1000, 0, 0, 0, 0, 0, 0, dr7])
        vcpu.set_guest_debug(enable=False)
        with pytest.raises(ValueError):
            vcpu.set_guest_debug(breakpoints=[0] * 9)


@pytest.mark.kvm
def test_attach_gdb_keeps_other_observers() -> None:
    with Machine(mem_size=4 << 20, irqchip=False) as machine:
        stats = ExitStats(machine.ports, machine.mmio)
        machine.observer = stats
        stub = attach_gdb(machine, "tcp::0")
        try:
            assert isinstance(machine.observer, CompositeObserver)
            assert machine.observer.observers == [stats, stub]
            assert stub.port != 0
            with pytest.raises(ValueError, match="cannot listen for gdb"):
                attach_gdb(machine, f"tcp::{stub.port}")
        finally:
            stub.close()


@pytest.mark.kvm
def test_probe_debug_support() -> None:
    started = time.monotonic()
    support = probe_debug_support()
    assert time.monotonic() - started < 5
    assert support.single_step and support.hw_breakpoints, support
    if host_kvm_module() == "kvm_pvm":
        # PVM: int3 at CPL0 is an instruction-emulation failure (shared/HOST-KVM.md).
        assert not support.sw_breakpoints


@pytest.mark.kvm
def test_wait_blocks_until_gdb_connects_and_detach_lets_it_run(
    running: list[RunningGuest],
) -> None:
    run = RunningGuest(guest("gdb_target"), wait=True)
    running.append(run)
    time.sleep(0.3)
    assert bytes(run.machine.console) == b""  # parked in on_start
    client = Client(run.stub.port)
    try:
        assert client.ask("?") == "T05thread:1;"
        registers = AMD64.decode(client.ask("g"))
        assert registers["rip"] == 0x100000
        assert client.ask("D") == "OK"
    finally:
        client.close()
    outcome = run.finish()
    assert (outcome.reason, outcome.exit_code) == ("exit", 0)
    assert b"counter=0000000000001001\n" in run.machine.console


@pytest.mark.kvm
def test_attach_to_a_running_guest_interrupt_and_kill(
    running: list[RunningGuest], assemble: Assembler
) -> None:
    spin = assemble("spin:\n    jmp spin\n", mode="long")
    run = RunningGuest(spin, wait=False)
    running.append(run)
    time.sleep(0.2)
    client = Client(run.stub.port)
    try:
        # Connecting stops the guest.
        assert client.ask("?") == "T05thread:1;"
        assert AMD64.decode(client.ask("g"))["rip"] == 0x100000
        assert client.ask("QStartNoAckMode") == "OK"
        client.no_ack = True
        client.send("c")
        time.sleep(0.2)
        client.sock.sendall(b"\x03")
        assert client.reply() == "T02thread:1;"
        assert AMD64.decode(client.ask("g"))["rip"] == 0x100000
        client.send("k")
    finally:
        client.close()
    outcome = run.finish()
    assert outcome.reason == "interrupted" and "killed by gdb" in outcome.message


@pytest.mark.kvm
def test_a_crash_stops_in_gdb_first(running: list[RunningGuest], assemble: Assembler) -> None:
    # ud2 with no IDT: a triple fault (or, on PVM, whatever KVM makes of it) ends the VM.
    crash = assemble("    nop\n    ud2\n", mode="long")
    run = RunningGuest(crash, wait=True)
    running.append(run)
    client = Client(run.stub.port)
    try:
        assert client.ask("?") == "T05thread:1;"
        client.send("c")
        stop = client.reply()
        assert stop == f"T{SIGSEGV:02x}thread:1;"
        assert AMD64.decode(client.ask("g"))["rip"] in (0x100001, 0x100003)
        client.send("c")
        assert client.reply() == f"X{SIGSEGV:02x}"
    finally:
        client.close()
    outcome = run.finish()
    assert outcome.reason in ("crash", "triple-fault")


@pytest.mark.kvm
def test_int3_breakpoints_are_hidden_from_memory_reads(running: list[RunningGuest]) -> None:
    # Pretend the host reports int3, to check the stub's bookkeeping (the guest never
    # runs into the int3: on PVM it would be an emulation failure).
    run = RunningGuest(guest("gdb_target"), wait=True, support=DebugSupport(sw_breakpoints=True))
    running.append(run)
    marker = 0x100011
    memory = run.machine.memory
    assert memory.read_u8(marker) == 0x90
    client = Client(run.stub.port)
    try:
        assert client.ask("?") == "T05thread:1;"
        assert client.ask(f"Z0,{marker:x},1") == "OK"
        assert memory.read_u8(marker) == 0xCC
        assert (
            client.ask(f"m{marker - 1:x},3") == "009048"
        )  # mov $1, %edx ends in 00; then nop (hidden), mov
        assert client.ask(f"M{marker:x},1:f4") == "OK"  # a write under the breakpoint
        assert memory.read_u8(marker) == 0xCC
        assert client.ask(f"z0,{marker:x},1") == "OK"
        assert memory.read_u8(marker) == 0xF4
        assert client.ask(f"M{marker:x},1:90") == "OK"
        assert client.ask(f"Z0,{marker:x},1") == "OK"
        assert client.ask("D") == "OK"  # detaching takes the int3 out again
    finally:
        client.close()
    outcome = run.finish()
    assert memory.read_u8(marker) == 0x90
    assert (outcome.reason, outcome.exit_code) == ("exit", 0)


def _gdb(elf: Path | None, port: int, commands: list[str]) -> str:
    assert GDB is not None
    argv = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off"]
    if elf is not None:
        argv += ["-ex", f"file {elf}"]
    argv += ["-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        argv += ["-ex", command]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    return result.stdout + result.stderr


@pytest.mark.kvm
@pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")
def test_real_gdb_session(running: list[RunningGuest], gdb_target_elf: Path) -> None:
    symbols = {
        name: int(address, 16)
        for address, _, name in (
            line.split()
            for line in subprocess.run(
                ["nm", str(gdb_target_elf)], capture_output=True, text=True, check=True
            ).stdout.splitlines()
        )
    }
    run = RunningGuest(guest("gdb_target"), wait=True)
    running.append(run)
    support = run.stub.support
    assert support is not None
    if support.watchpoints:
        watch = ["watch *(long *)&counter"]
    else:  # the stub refuses it; then gdb's software watchpoint single-steps and compares
        watch = ["watch *(long *)&counter", "continue", "delete 2",
                 "set can-use-hw-watchpoints 0", "watch *(long *)&counter"]  # fmt: skip
    output = _gdb(
        gdb_target_elf,
        run.stub.port,
        [
            "info registers rip",
            "break marker",
            "continue",
            "info registers rip",
            "x/gx &counter",
            "set *(long *)&counter = 0x2000",
            "set var $rdx = 0x10",
            "x/gx &counter",
            "stepi",
            "info registers rip",
            *watch,
            "continue",
            "info registers rip",
            "delete",
            "hbreak done",
            "continue",
            "info registers rip",
            "info threads",
            "continue",
        ],
    )
    outcome = run.finish()
    print(output)

    def rip_line(name: str) -> str:
        return rf"rip\s+{symbols[name]:#x}\s+{symbols[name]:#x} <{name}>"

    assert re.search(rip_line("_start"), output), output
    assert re.search(r"Breakpoint 1, 0x0*100011 in marker", output), output
    assert re.search(rip_line("marker"), output), output
    assert re.search(r"<counter>:\s+0x0000000000001000", output), output
    assert re.search(r"<counter>:\s+0x0000000000002000", output), output
    assert re.search(rip_line("load"), output), output
    assert re.search(r"Old value = 8192\s+New value = 8208", output), output
    assert re.search(rip_line("after_store"), output), output
    assert "Hardware assisted breakpoint" in output
    assert re.search(r"Breakpoint \d+, 0x0*100042 in done", output), output
    assert re.search(rip_line("done"), output), output
    assert re.search(r"\* 1\s+Thread 1 \(vCPU 0\)", output), output
    assert "[Inferior 1 (Remote target) exited normally]" in output
    assert not re.search(r"^warning:", output, re.MULTILINE), output
    assert b"counter=0000000000002010\n" in run.machine.console
    assert (outcome.reason, outcome.exit_code) == ("exit", 0)
    if not support.sw_breakpoints:
        assert any("uses a hardware debug register" in line for line in run.log)
    if not support.watchpoints:
        assert "Could not insert hardware watchpoint 2" in output
        assert any("hardware watchpoints are refused" in line for line in run.log)


@pytest.mark.kvm
@pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")
def test_real_gdb_on_a_real_mode_guest_gets_the_i386_layout(running: list[RunningGuest]) -> None:
    run = RunningGuest(guest("real_hello"), wait=True, mode="real")
    running.append(run)
    output = _gdb(
        None,
        run.stub.port,
        [
            "show architecture",
            "info registers eip cs",
            "stepi",
            "info registers eip",
            "hbreak *0x7c10",
            "continue",
            "info registers eip",
            "p/x $cr0",
            "continue",
        ],
    )
    outcome = run.finish()
    print(output)
    assert "internal-error" not in output
    assert re.search(r"currently \"?i386\"?\)", output), output
    assert re.search(r"eip\s+0x7c00\s", output), output
    assert re.search(r"cs\s+0x0\s", output), output
    assert re.search(r"eip\s+0x7c01\s", output), output
    assert re.search(r"Breakpoint 1, 0x00007c10", output), output
    assert re.search(r"eip\s+0x7c10\s", output), output
    assert re.search(r"\$1 = 0x[0-9a-f]*0\b", output), output  # CR0.PE clear
    assert "[Inferior 1 (Remote target) exited normally]" in output
    assert (outcome.reason, outcome.exit_code) == ("exit", 0)
    assert any("real mode: target i386" in line for line in run.log), run.log


@pytest.mark.kvm
def test_the_layout_can_be_forced(running: list[RunningGuest]) -> None:
    run = RunningGuest(guest("real_hello"), wait=True, mode="real")
    running.append(run)
    run.stub.arch = "i386:x86-64"
    client = Client(run.stub.port)
    try:
        assert "<architecture>i386:x86-64</architecture>" in client.ask(
            "qXfer:features:read:target.xml:0,400"
        )
        assert AMD64.decode(client.ask("g"))["rip"] == 0x7C00
        assert client.ask("D") == "OK"
    finally:
        client.close()
    assert run.finish().exit_code == 0
    assert any("real mode: target i386:x86-64" in line for line in run.log), run.log
