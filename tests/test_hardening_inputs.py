"""Issue 9, items 4-11: images and options that once crashed kvmpy, hung it, grew it
without bound, or exited with a status that looked like success."""

from __future__ import annotations

import builtins
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmpy import __main__ as entry_point
from kvmpy._process import Terminated
from kvmpy.cli import build_parser, main
from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment, check_plan
from kvmpy.loaders.detect import load_image
from kvmpy.loaders.elf import read_image
from kvmpy.loaders.multiboot import load_multiboot
from kvmpy.memory import MAX_RAM_SIZE, PAGE_SIZE, GuestMemory, GuestMemoryError
from tests.helpers import ROOT
from tests.images import elf32, elf64, flat, multiboot_aout, pvh

RAM = [(0, 16 << 20)]
# A real-mode guest that writes "A" to COM1 forever: mov $0x3f8,%dx; mov $'A',%al;
# out %al,(%dx); jmp back to the out.
CHATTY_GUEST = bytes.fromhex("baf803b041eeebfd")
# A real-mode guest that spins without exits: jmp $.
SPINNING_GUEST = bytes.fromhex("ebfe")


def kvmpy_shell(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in bash, with `kvmpy` meaning this checkout's ``python -m kvmpy``."""
    kvmpy = f"{shlex.quote(sys.executable)} -m kvmpy"
    return subprocess.run(
        ["bash", "-c", command.replace("kvmpy ", kvmpy + " ")],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("kvmpy: error:")]


@pytest.fixture
def pipe_path() -> Iterator[tuple[str, int]]:
    """A pipe's read end as a path (what bash's <(...) gives) and its write end."""
    read_fd, write_fd = os.pipe()
    try:
        yield f"/dev/fd/{read_fd}", write_fd
    finally:
        os.close(read_fd)
        with contextlib.suppress(OSError):  # the writer closed it
            os.close(write_fd)


def feed(write_fd: int, data: bytes) -> threading.Thread:
    """Write ``data`` to a pipe from a thread, then close it (EOF for the reader)."""

    def write() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view) :]
        except BrokenPipeError:
            pass  # the reader stopped at its cap
        finally:
            os.close(write_fd)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


# -- 5, 6: special files are refused; every input is read once, capped --------------------


def test_a_character_device_is_refused_without_reading() -> None:
    with pytest.raises(LoaderError) as info:
        load_image("/dev/zero", ram=RAM, load_addr=0x7C00)
    assert str(info.value) == (
        "/dev/zero: cannot read image: it is a character device, not a regular file or a pipe"
    )


@pytest.mark.parametrize(
    ("image", "image_format"),
    [(flat(), "flat"), (elf64(), None), (pvh(), None), (multiboot_aout(), None)],
    ids=["flat", "elf", "pvh", "multiboot"],
)
def test_an_image_from_a_pipe_is_read_once(
    image: bytes, image_format: str | None, pipe_path: tuple[str, int]
) -> None:
    """`kvmpy run <(cat kernel)`: detection used to eat the pipe ("image is empty").

    A headerless image from a pipe is flat only when asked for (--format flat).
    """
    path, write_fd = pipe_path
    feed(write_fd, image)
    plan = load_image(path, ram=RAM, load_addr=0x100000, image_format=image_format)
    assert plan.segments[0].data[:16] == image[: len(plan.segments[0].data)][:16]


def test_an_image_from_a_named_fifo_is_read_once(tmp_path: Path) -> None:
    """A FIFO used to be opened twice: the second open waited for a writer forever."""
    fifo = tmp_path / "kernel.fifo"
    os.mkfifo(fifo)
    image = elf32()

    def writer() -> None:
        with fifo.open("wb") as f:
            f.write(image)

    threading.Thread(target=writer, daemon=True).start()
    result: list[LoadPlan | BaseException] = []

    def reader() -> None:
        try:
            result.append(load_image(fifo, ram=RAM, load_addr=0x100000))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # release the reader stuck in open() before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("loading from a FIFO hung")
    assert isinstance(result[0], LoadPlan), result
    assert result[0].segments[0].data == image


def test_a_pipe_is_capped(pipe_path: tuple[str, int]) -> None:
    path, write_fd = pipe_path
    feed(write_fd, bytes(5000))
    with pytest.raises(LoaderError, match=r"image is more than the 1000 bytes allowed"):
        read_image(path, 1000)


def test_a_module_from_a_pipe(pipe_path: tuple[str, int]) -> None:
    path, write_fd = pipe_path
    feed(write_fd, b"module bytes")
    plan = load_multiboot("k", ram=RAM, modules=[(path, "")], data=multiboot_aout())
    assert [seg.data for seg in plan.segments if seg.data == b"module bytes"]


def test_a_module_from_a_device_is_refused() -> None:
    with pytest.raises(LoaderError, match="it is a character device"):
        load_multiboot("k", ram=RAM, modules=[("/dev/zero", "")], data=multiboot_aout())


# -- 7: --mem beyond reason -----------------------------------------------------------


def test_mem_beyond_the_maximum_is_one_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", "--mem", "100000G", "x"])
    assert info.value.code == 2
    assert "'100000G' is more guest RAM than the 1024G kvmpy allows" in capsys.readouterr().err


def test_ram_that_cannot_be_mapped_is_a_guest_memory_error() -> None:
    with pytest.raises(GuestMemoryError, match="more than the 1024 GiB"):
        GuestMemory.with_ram(MAX_RAM_SIZE + PAGE_SIZE)
    with pytest.raises(GuestMemoryError, match="cannot map"):
        GuestMemory().add_region(0, 1 << 48)  # more than a process's address space


# -- 8: --timeout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nan", "not a number of seconds: 'nan'"),
        ("inf", "is more than a year"),
        ("1e308", "is more than a year"),
        ("-1", "timeout must be positive"),
        ("-inf", "timeout must be positive"),
        ("0", "timeout must be positive"),
    ],
)
def test_unusable_timeouts_are_refused(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", f"--timeout={text}", "x"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# -- 9: entries -------------------------------------------------------------------------


def test_an_address_wider_than_64_bits_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--entry", "0xFFFFFFFFFFFFFFFFFF", "x"])
    assert "address is wider than 64 bits" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mode", "option", "value"),
    [("real", "--entry", "0x100000"), ("protected", "--entry", "0x100000000"),
     ("long", "--load-addr", "0x100000000")],
)  # fmt: skip
def test_an_address_out_of_reach_of_the_mode_is_one_error(
    mode: str, option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--mode", mode, option, value, "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [
        f"kvmpy: error: {option} {int(value, 0):#x} is out of reach in {mode} mode "
        f"(below {1 << 20 if mode == 'real' else 1 << 32:#x})"
    ]


def test_check_plan_wants_the_entry_in_the_loaded_image() -> None:
    segment = LoadSegment(0x100000, b"\xf4" * 16, 0x1000)
    with GuestMemory.with_ram(16 << 20) as memory:
        check_plan(LoadPlan("k", 0x10000F, [segment]), memory, [])
        for entry in (0x100010, 0xFFFFF, 0x200000, 1 << 40, 1 << 64):  # bss, before, outside
            with pytest.raises(LoaderError, match=f"k: entry {entry:#x} is not inside the loaded"):
                check_plan(LoadPlan("k", entry, [segment]), memory, [])
        boot = LoadSegment(0x9000, b"info", 4)
        with pytest.raises(LoaderError, match="entry 0x9000 is not inside"):
            check_plan(LoadPlan("k", 0x9000, [segment, boot], reserved=[(0x9000, 0x9004)]),
                       memory, [])  # fmt: skip


def test_a_pvh_entry_outside_the_kernel_is_refused() -> None:
    from tests.images import xen_entry_note

    with pytest.raises(LoaderError, match=r"k: PHYS32_ENTRY 0x5000 is not inside"):
        load_image("k", ram=RAM, load_addr=0, data=elf32(notes=xen_entry_note(0x5000)))


# -- 11: Ctrl-C and SIGTERM before the run ------------------------------------------------


@pytest.mark.parametrize(
    ("exception", "status", "line"),
    [(KeyboardInterrupt, 130, "kvmpy: interrupted"), (Terminated, 143,
      "kvmpy: terminated")],
)  # fmt: skip
def test_a_signal_during_the_start_up_imports_is_one_line(
    exception: type[BaseException],
    status: int,
    line: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_import = builtins.__import__

    def interrupted_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "kvmpy.cli":
            raise exception
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's handlers
    assert entry_point.entry() == status
    assert capsys.readouterr().err == line + "\n"


# -- with /dev/kvm ------------------------------------------------------------------------


def vm_rss() -> int:
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            return int(text.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.mark.kvm
def test_a_huge_bss_commits_no_host_memory() -> None:
    """Item 4: a tiny ELF with p_memsz = 1 GiB used to commit 1 GiB, written byte by byte."""
    from kvmpy.loaders.elf import load_elf
    from kvmpy.machine import Machine

    image = elf64(memsz=1 << 30)
    assert len(image) < 200
    with Machine(mem_size=2 << 30, irqchip=False) as m:
        m.memory.write(0x200000, b"\xaa" * 0x1000)  # not fresh: old data in the bss
        before = vm_rss()
        m.load(load_elf("huge-bss.elf", image))
        grown = vm_rss() - before
        assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB"
        assert m.memory.read(0x200000, 0x1000) == bytes(0x1000)


@pytest.mark.kvm
def test_cli_refuses_dev_zero() -> None:
    result = kvmpy_shell("kvmpy run /dev/zero")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "kvmpy: error: /dev/zero: cannot read image: it is a character device, not a regular "
        "file or a pipe"
    ]


@pytest.mark.kvm
def test_cli_runs_an_image_from_process_substitution(tmp_path: Path) -> None:
    image = tmp_path / "guest.bin"
    image.write_bytes(bytes.fromhex("b000e6f4"))  # mov $0,%al; out %al,$0xf4: status 1
    # A pipe has no telling name: a headerless image needs --format flat.
    result = kvmpy_shell(f"kvmpy run --timeout 20 --format flat <(cat {image})")
    assert error_lines(result.stderr) == []
    assert result.returncode == 1, result.stderr


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("redirect", "reason"),
    [("| head -c5 >/dev/null", "Broken pipe"), (">/dev/full", "No space left on device")],
)
def test_a_failing_stdout_is_an_error_not_success(
    tmp_path: Path, redirect: str, reason: str
) -> None:
    """Item 10: the guest keeps writing to a stdout that fails: status 2, one line."""
    image = tmp_path / "chatty.bin"
    image.write_bytes(CHATTY_GUEST)
    result = kvmpy_shell(f"kvmpy run --timeout 30 {image} {redirect}; exit ${{PIPESTATUS[0]}}")
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [
        f"kvmpy: error: cannot write the guest's output to stdout: {reason}"
    ]


@pytest.mark.kvm
def test_a_closed_stdout_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "chatty.bin"
    image.write_bytes(CHATTY_GUEST)
    result = kvmpy_shell(f"kvmpy run --timeout 30 {image} >&-")
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [
        "kvmpy: error: stdout is closed (use >/dev/null to discard the guest's output)"
    ]


@pytest.mark.kvm
def test_sigterm_stops_the_run_and_still_saves_the_snapshot(tmp_path: Path) -> None:
    image = tmp_path / "spin.bin"
    image.write_bytes(SPINNING_GUEST)
    snapshot = tmp_path / "snap"
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", str(image), "--snapshot-at-exit", str(snapshot)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    time.sleep(3)  # well into the run
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines[0] == f"kvmpy: snapshot saved to {snapshot}"
    assert lines[1].startswith("kvmpy: terminated (SIGTERM): vCPU 0: interrupted at RIP=0x7c00")
    assert len(lines) == 2
    assert (snapshot / "snapshot.json").is_file()
