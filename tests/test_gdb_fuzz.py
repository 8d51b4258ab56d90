"""Random gdb byte streams through the packet decoder and a session: no exception, bounded state.

A short budget by default; KVMPY_FUZZ_EXAMPLES=20000 runs a long one.
"""

from __future__ import annotations

import os

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvmpy.debug.gdbproto import (
    PACKET_SIZE,
    Ack,
    BadPacket,
    GdbSession,
    Interrupt,
    Packet,
    PacketDecoder,
    escape,
    frame,
)
from kvmpy.x86.gdb_registers import AMD64, I386
from tests.test_gdbstub import FakeTarget

EXAMPLES = int(os.environ.get("KVMPY_FUZZ_EXAMPLES", "200"))
MEMORY = {0x1000 + i: i for i in range(64)}

# Every command the session knows, and a few it does not.
COMMANDS = [
    b"?", b"g", b"G", b"p", b"P", b"m", b"M", b"X", b"c", b"s", b"C", b"S", b"Z", b"z",
    b"Hg", b"Hc", b"T", b"D", b"k", b"vCont?", b"vCont;", b"vKill", b"vMustReplyEmpty",
    b"qSupported:", b"qXfer:features:read:target.xml:", b"qXfer:", b"qC", b"qAttached",
    b"qfThreadInfo", b"qsThreadInfo", b"qThreadExtraInfo,", b"qSymbol::", b"QStartNoAckMode",
    b"!", b"R", b"",
]  # fmt: skip
_numbers = st.one_of(
    st.integers(0, 0x2000),
    st.integers(0, 1 << 72),
    st.sampled_from([(1 << 64) - 1, 1 << 64, 0x1000, 0x103F]),
).map(lambda n: f"{n:x}".encode())
_pieces = st.one_of(
    _numbers,
    st.sampled_from([b",", b":", b";", b"=", b"-1", b"p1.2", b"xx", b"c", b"s:1", b"+"]),
    st.binary(max_size=12),
    st.binary(max_size=12).map(escape),
)
_free_form = st.tuples(st.sampled_from(COMMANDS), st.lists(_pieces, max_size=10)).map(
    lambda parts: parts[0] + b"".join(parts[1])
)
# Shaped like real packets (m ADDR,LEN / Z TYPE,ADDR,KIND / c ADDR ...), numbers of any size.
_shaped = st.tuples(
    st.sampled_from([b"m", b"M", b"X", b"Z", b"z", b"c", b"s", b"C05;", b"S05;", b"Hg", b"T"]),
    _numbers,
    st.sampled_from([b"", b","]),
    _numbers,
    st.sampled_from([b"", b",", b":"]),
    _numbers,
).map(b"".join)
_payloads = st.one_of(_free_form, _shaped)
_chunks = st.one_of(
    _payloads.map(frame),
    _payloads.map(lambda payload: frame(payload)[:-2] + b"zz"),  # a bad checksum
    _payloads.map(lambda payload: frame(payload)[:-3]),  # cut short
    st.sampled_from([b"+", b"-", b"\x03", b"$", b"#", b"}", b"$" + b"a" * 300]),
    st.binary(max_size=40),
)


@settings(max_examples=EXAMPLES, deadline=None)
# Found by this test before numbers were bounded: a continue address of 2^64.
@example(chunks=[b"$c0010000000000000000#f4"], split=1, i386=False)
@given(
    chunks=st.lists(_chunks, max_size=40),
    split=st.integers(1, 64),
    i386=st.booleans(),
)
def test_random_packet_streams_never_raise_and_stay_bounded(
    chunks: list[bytes], split: int, i386: bool
) -> None:
    target = FakeTarget(layout_=I386 if i386 else AMD64, memory=dict(MEMORY))
    session = GdbSession(target)
    decoder = PacketDecoder(max_size=256)
    data = b"".join(chunks)
    for start in range(0, len(data), split):
        for event in decoder.feed(data[start : start + split]):
            assert isinstance(event, Packet | BadPacket | Interrupt | Ack)
            if not isinstance(event, Packet):
                continue
            assert len(event.payload) <= decoder.max_size
            reply = session.handle(event.payload)
            assert reply is None or (isinstance(reply, str) and len(reply) <= PACKET_SIZE)
            session.running = False  # as if every resume stopped at once
        assert decoder.buffered <= decoder.max_size + 2
    # Every number that reached the target fits in 64 bits (or its register, if wider).
    assert all(0 <= address < 1 << 64 for _, address, _ in target.breakpoints)
    assert all(0 <= length < 1 << 64 for _, _, length in target.breakpoints)
    assert all(0 <= address < 1 << 64 for address in target.memory)
    bits = {reg.name: max(reg.bits, 64) for reg in target.layout_.registers}
    for values in target.registers.values():
        assert all(0 <= value < 1 << bits[name] for name, value in values.items())
    assert len(session.gdb_features) <= decoder.max_size
