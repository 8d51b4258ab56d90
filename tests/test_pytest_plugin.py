"""kvmpy's pytest plugin: kvm_machine, the kvm marker, --kvm-timeout, the guest runner.

The plugin is loaded here through its pytest11 entry point, as in any project
that installs kvmpy; ``pytester`` runs inner pytest sessions to check what
other projects see (skips, failures, report sections, collection).
"""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest

from kvmpy.backends.base import BackendError as KvmError
from kvmpy.pytest_plugin import GuestStopped, MachineFactory, SerialTimeout, TestMachine
from kvmpy.testing import ScreenTimeout, format_tail, guest_results, load_machine
from tests.helpers import Assembler, guest

pytest_plugins = ["pytester"]

# Real-mode guests (flat, at 0x7c00).  A puts routine prints the string at SI.
PUTS = """
puts:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret
"""
# Say "login: ", read a line from COM1, answer "hello, NAME", exit with code 0.
ECHO = (
    """
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov $prompt, %si
    call puts
    mov $0x6000, %di
1:  mov $0x3fd, %dx
2:  in %dx, %al
    test $1, %al
    jz 2b
    mov $0x3f8, %dx
    in %dx, %al
    cmp $10, %al
    je 3f
    stosb
    jmp 1b
3:  movb $0, (%di)
    mov $hello, %si
    call puts
    mov $0x6000, %si
    call puts
    mov $newline, %si
    call puts
    xor %al, %al
    out %al, $0xf4
    hlt
"""
    + PUTS
    + """
prompt: .asciz "login: "
hello: .asciz "hello, "
newline: .asciz "\\n"
"""
)
# Say "ready", then spin forever.
SPIN = (
    """
    xor %ax, %ax
    mov %ax, %ds
    mov $ready, %si
    call puts
9:  jmp 9b
"""
    + PUTS
    + 'ready: .asciz "ready\\n"\n'
)


# Paint "PAINTED" at the top left of the VGA text screen, then spin (or exit with 3).
PAINT = """
    mov $0xb800, %ax
    mov %ax, %es
    xor %di, %di
    mov $0x1f, %ah
    mov $text, %si
1:  lodsb %cs:(%si), %al
    test %al, %al
    jz 2f
    stosw
    jmp 1b
2:  {end}
text: .asciz "PAINTED"
"""


def exit_with(code: int, *lines: str) -> str:
    """A guest that prints ``lines`` and exits with debug-exit ``code``."""
    strings = "".join(f'm{i}: .asciz "{line}\\n"\n' for i, line in enumerate(lines))
    prints = "".join(f"mov $m{i}, %si\ncall puts\n" for i in range(len(lines)))
    exit = f"mov ${code}, %al\nout %al, $0xf4\nhlt\n"
    return f"xor %ax, %ax\nmov %ax, %ds\n{prints}{exit}{PUTS}{strings}"


# -- the kvm_machine fixture, used directly ------------------------------------------------


@pytest.mark.kvm
def test_run_to_the_guest_exit(kvm_machine: MachineFactory) -> None:
    m = kvm_machine(guest("real_hello"), mem="16M")
    assert isinstance(m, TestMachine)
    result = m.run()
    assert (result.reason, result.status, result.exit_code) == ("exit", 1, 0)
    assert result.output.startswith(b"Hello from real mode!\n")
    assert result.output == m.output == m.serial.output
    assert result.outcome.message == result.message


def test_expect_and_send_like_pexpect(kvm_machine: MachineFactory, assemble: Assembler) -> None:
    m = kvm_machine(assemble(ECHO), mem=16 << 20)
    m.start()
    match = m.serial.expect(b"login: ", timeout=10)
    assert match.group() == b"login: "
    assert m.serial.position == match.end() == 7
    m.serial.send(b"kvmpy\n")
    match = m.serial.expect(re.compile(rb"hello, (\w+)\n"), timeout=10)
    assert match.group(1) == b"kvmpy"
    assert m.serial.before == b""
    result = m.wait()
    assert (result.status, result.output) == (1, b"login: hello, kvmpy\n")


def test_expect_consumes_the_output_in_order(
    kvm_machine: MachineFactory, assemble: Assembler
) -> None:
    m = kvm_machine(assemble(exit_with(0, "one", "two", "one")), mem="16M")
    m.start()
    first = m.serial.expect(b"one")
    m.serial.expect("two")
    second = m.serial.expect(b"one")
    assert (first.start(), second.start()) == (0, 8)
    assert m.serial.before == b"\n"
    with pytest.raises(GuestStopped, match=r"stopped before b'one' appeared.*status 1"):
        m.serial.expect(b"one")


def test_run_until_a_pattern_stops_the_guest(
    kvm_machine: MachineFactory, assemble: Assembler
) -> None:
    m = kvm_machine(assemble(SPIN), mem="16M")
    result = m.run(until=b"ready")
    assert (result.reason, result.status) == ("stopped", 0)
    assert result.match is not None and result.match.group() == b"ready"
    assert not m.running
    assert m.wait() is result


def test_expect_timeout_shows_the_output_tail(
    kvm_machine: MachineFactory, assemble: Assembler
) -> None:
    m = kvm_machine(assemble(SPIN), mem="16M")
    m.start()
    started = time.monotonic()
    with pytest.raises(SerialTimeout) as caught:
        m.serial.expect(b"login:", timeout=0.3)
    assert time.monotonic() - started < 5
    assert not isinstance(caught.value, GuestStopped)
    assert isinstance(caught.value, AssertionError)
    message = str(caught.value)
    assert "b'login:' did not appear on the serial port within 0.3 s" in message
    assert "serial output (6 bytes):\n  | ready" in message
    assert caught.value.output == b"ready\n"


def test_expect_when_the_guest_stops_first(
    kvm_machine: MachineFactory, assemble: Assembler
) -> None:
    m = kvm_machine(assemble(exit_with(5, "bye")), mem="16M")
    m.start()
    with pytest.raises(GuestStopped) as caught:
        m.serial.expect(b"never", timeout=30)
    assert caught.value.outcome is not None and caught.value.outcome.exit_code == 5
    assert "guest exit code 0x5 (status 11)" in str(caught.value)
    assert "  | bye" in str(caught.value)


def test_screen_expect_waits_for_what_the_guest_paints(
    kvm_machine: MachineFactory, assemble: Assembler
) -> None:
    m = kvm_machine(assemble(PAINT.format(end="9: jmp 9b")), mem="16M")
    m.start()
    match = m.screen.expect(re.compile(r"PAIN(\w+)"), timeout=10)
    assert match.group(1) == "TED"
    assert m.screen.text().splitlines()[0] == "PAINTED"
    with pytest.raises(ScreenTimeout) as caught:
        m.screen.expect("never painted", timeout=0.2)
    assert "'never painted' did not appear on the screen: not within 0.2 s" in str(caught.value)
    assert caught.value.screen.startswith("PAINTED\n")


def test_screen_expect_when_the_guest_stops_first(
    kvm_machine: MachineFactory, assemble: Assembler
) -> None:
    m = kvm_machine(assemble(PAINT.format(end="mov $3, %al\nout %al, $0xf4\nhlt")), mem="16M")
    m.start()
    with pytest.raises(ScreenTimeout, match=r"the guest stopped: guest exit code 0x3") as caught:
        m.screen.expect("never", timeout=30)
    assert "the screen:\nPAINTED" in str(caught.value)
    assert isinstance(caught.value, AssertionError)


def test_machine_timeout_stops_the_guest(kvm_machine: MachineFactory, assemble: Assembler) -> None:
    m = kvm_machine(assemble(SPIN), mem="16M", timeout=0.3)
    started = time.monotonic()
    result = m.run()
    assert time.monotonic() - started < 5
    assert (result.reason, result.status) == ("timeout", 124)
    assert result.report is not None and result.report.regs is not None


def test_a_machine_runs_once_and_closes_once(kvm_machine: MachineFactory) -> None:
    m = kvm_machine(guest("real_hello"), mem="16M")
    with pytest.raises(RuntimeError, match="start the machine"):
        m.serial.expect(b"Hello")
    m.run()
    with pytest.raises(RuntimeError, match="runs once"):
        m.start()
    m.close()
    m.close()
    assert m.closed


def test_load_machine_reports_an_unusable_kvm(assemble: Assembler) -> None:
    with pytest.raises(KvmError, match="/nonexistent/kvm"):
        load_machine(assemble(ECHO), mem="16M", kvm_path="/nonexistent/kvm")


@pytest.mark.kvm
def test_load_machine_as_a_context_manager() -> None:
    with load_machine(guest("long_hello"), mem="16M", mode="long", timeout=30) as m:
        assert m.run().status == 1
    assert m.closed


def test_guest_results_and_tails() -> None:
    output = b"boot\r\nPASS: one\r\nFAIL: two words\nSKIP: three\nXFAIL: four\nnot PASS: five\n"
    assert guest_results(output) == [
        ("PASS", "one"),
        ("FAIL", "two words"),
        ("SKIP", "three"),
        ("XFAIL", "four"),
    ]
    assert format_tail(b"") == "serial output: (none)"
    tail = format_tail(b"a\n" * 10, limit=4)
    assert tail == "last 4 of 20 bytes of serial output:\n  | a\n  | a"


# -- inner pytest sessions --------------------------------------------------------------------


NEEDS_KVM_TESTS = """
import pytest

@pytest.mark.kvm
def test_marked():
    pass

def test_fixture(kvm_machine):
    pass

def test_plain():
    pass
"""


def test_kvm_tests_skip_without_kvm(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVMPY_REQUIRE_KVM", raising=False)
    pytester.makepyfile(NEEDS_KVM_TESTS)
    result = pytester.runpytest("--kvm-device=/nonexistent/kvm", "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    # Each skip names the test's own file and line, not the plugin's.
    skips = [line for line in result.outlines if line.startswith("SKIPPED [1] ")]
    assert len(skips) == 2
    for line in skips:
        assert re.match(r"SKIPPED \[1\] test_kvm_tests_skip_without_kvm.py:\d+: ", line), line
        assert "KVM is unusable: open /nonexistent/kvm failed" in line


def test_kvm_tests_fail_when_kvm_is_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMPY_REQUIRE_KVM", "1")
    pytester.makepyfile(NEEDS_KVM_TESTS)
    result = pytester.runpytest("--kvm-device=/nonexistent/kvm")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*KVMPY_REQUIRE_KVM=1 but KVM is unusable: *"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kvm-timeout=-1"], "--kvm-timeout must be 0 or more seconds"),
        (["--kvm-guests=missing"], "--kvm-guests: */missing is not a directory"),
    ],
)
def test_bad_options(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


@pytest.mark.kvm
def test_kvm_timeout_option_and_per_machine_timeout(
    pytester: pytest.Pytester, assemble: Assembler
) -> None:
    spin = assemble(SPIN)
    pytester.makepyfile(
        f"""
        def test_default(kvm_machine):
            assert kvm_machine({str(spin)!r}, mem="16M").timeout == 0.25

        def test_option(kvm_machine):
            result = kvm_machine({str(spin)!r}, mem="16M").run()
            assert (result.reason, result.status) == ("timeout", 124)
            assert "after 0.25 s" in result.message

        def test_per_machine(kvm_machine):
            assert kvm_machine({str(spin)!r}, mem="16M", timeout=7).timeout == 7
        """
    )
    started = time.monotonic()
    result = pytester.runpytest("--kvm-timeout=0.25")
    result.assert_outcomes(passed=3)
    assert time.monotonic() - started < 10


@pytest.mark.kvm
def test_failure_report_has_serial_output_and_vcpu_state(
    pytester: pytest.Pytester, assemble: Assembler
) -> None:
    spin = assemble(SPIN)
    pytester.makepyfile(
        f"""
        import threading

        machines = []

        def test_fails_while_the_guest_runs(kvm_machine):
            m = kvm_machine({str(spin)!r}, mem="16M")
            machines.append(m)
            m.start()
            m.serial.expect(b"login:", timeout=0.2)

        def test_the_machine_was_closed():
            assert machines[0].closed
            assert not [t for t in threading.enumerate() if t.name.startswith("kvmpy-vcpu")]
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E *.SerialTimeout: b'login:' did not appear on the serial port within 0.2 s *",
            "E *| ready",
            "test_failure_report_*.py:9: SerialTimeout",
            "*- kvm machine 1 (guest0.bin): serial output -*",
            "ready",
            "*- kvm machine 1 (guest0.bin): stopped, status 0 -*",
            "stopped: the test failed",
            "vCPU 0: stopped at RIP=0x7c* (real mode)",
            "*RIP=*",
            "*=> 0x7c*: jmp 0x7c*",
        ]
    )


@pytest.mark.kvm
def test_failure_report_has_the_crash_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        f"""
        def test_crash(kvm_machine):
            m = kvm_machine({str(guest("triple_fault"))!r}, mem="16M", mode="long")
            assert m.run().status == 1
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- kvm machine 1 (triple_fault.bin): triple-fault, status 4 -*",
            "*vCPU 0: triple fault*",
            "*=> 0x100007: ud2*",
        ]
    )


def guests_dir(root: Path, assemble: Assembler) -> Path:
    """A directory of guests that pass, fail, skip and crash."""
    directory = root / "guests"
    directory.mkdir()
    images = {
        "passes": exit_with(0, "PASS: one", "SKIP: two"),
        "fails": exit_with(1, "PASS: one", "FAIL: two"),
        "skips": exit_with(38, "SKIP: no SMP here"),
        # An empty IDT: the #UD cannot be delivered and the CPU shuts down (PVM,
        # which ignores a real-mode IDT limit, fails on the IVT's zeros instead).
        "crashes": "lidt %cs:idt0 - _start + 0x7c00\nud2\nidt0: .word 0\n.long 0",
    }
    for name, source in images.items():
        assemble(source).rename(directory / f"{name}.bin")
    (directory / "notes.txt").write_text("not a guest")
    return directory


@pytest.mark.kvm
def test_guest_images_become_tests(pytester: pytest.Pytester, assemble: Assembler) -> None:
    guests_dir(pytester.path, assemble)
    result = pytester.runpytest("--kvm-guests=guests", "-v", "-rs")
    result.assert_outcomes(passed=1, failed=2, skipped=1)
    result.stdout.fnmatch_lines_random(
        [
            "guests/passes.bin::passes PASSED*",
            "guests/fails.bin::fails FAILED*",
            "guests/skips.bin::skips SKIPPED*",
            "guests/crashes.bin::crashes FAILED*",
            "guest fails (fails.bin): expected exit code 0 (status 1), "
            "but guest exit code 0x1 (status 3)",
            "guest results: 1 PASS, 1 FAIL",
            "  FAIL: two",
            "*- guest results of fails -*",
            "*- kvm machine 1 (crashes.bin): crash, status 4 -*",
            "SKIPPED [[]1[]] guests/skips.bin:1: skips: guest skipped (guest exit code 0x26 "
            "(status 77)): no SMP here",
        ]
    )
    assert "notes" not in result.stdout.str()


@pytest.mark.kvm
def test_guests_toml_declares_runs_and_expectations(
    pytester: pytest.Pytester, assemble: Assembler
) -> None:
    directory = guests_dir(pytester.path, assemble)
    (directory / "guests.toml").write_text(
        textwrap.dedent(
            """
            [[guest]]
            name = "passes"
            image = "passes.bin"
            expect_output = "^SKIP: two$"

            [[guest]]
            name = "fails-as-declared"
            image = "fails.bin"
            expect_status = 3

            [[guest]]
            name = "crash-expected"
            image = "crashes.bin"
            expect_status = 4

            [[guest]]
            name = "wrong-output"
            image = "passes.bin"
            expect_output = "^nope"

            [[guest]]
            name = "hello-long"
            image = "../hello.bin"
            mode = "long"
            cpus = 2
            mem = "32M"
            args = "x"
            timeout = 30

            [[guest]]
            name = "missing"
            image = "missing.bin"
            """
        )
    )
    (pytester.path / "hello.bin").write_bytes(guest("long_hello").read_bytes())
    result = pytester.runpytest("--kvm-guests=guests", "-v")
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "guests/guests.toml::passes PASSED*",
            "guests/guests.toml::fails-as-declared PASSED*",
            "guests/guests.toml::crash-expected PASSED*",
            "guests/guests.toml::hello-long PASSED*",
            "guest wrong-output (passes.bin): the output does not match '^nope'",
            "*/guests/missing.bin does not exist (is the guest built?)",
        ]
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[guest]]\nname = "a"\nimage = "a.bin"\ncpu = 2\n', "unknown key(s) cpu"),
        ('[[guest]]\nname = "a"\n', "image is required"),
        ('[[guest]]\nname = "a"\nimage = "a.bin"\ncpus = "2"\n', "cpus must be int, not '2'"),
        ('[[guest]]\nname = "a"\nimage = "a.bin"\nmode = "vm86"\n', "mode must be one of"),
        ('[[guest]]\nname = "a"\nimage = "a.bin"\nmem = "lots"\n', "not a size: 'lots'"),
        ('[[guest]]\nname = "a"\nimage = "a"\n[[guest]]\nname = "a"\nimage = "b"\n', "two guests"),
        ('[[guest]]\nname = "a"\nimage = "a"\nappend = "x"\nargs = "y"\n', "not both"),
        ("[guests]\n", "unknown top-level key(s) guests"),
        ("[[guest]\n", "guests.toml: "),
    ],
)
def test_bad_guests_toml_is_a_collection_error(
    pytester: pytest.Pytester, toml: str, message: str
) -> None:
    directory = pytester.mkdir("guests")
    (directory / "guests.toml").write_text(toml)
    result = pytester.runpytest("--kvm-guests=guests", "--co")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert message in result.stdout.str()


def test_tool_kvmpy_sets_the_default_guests_dir(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyprojecttoml('[tool.kvmpy]\nguests = "g"\n')
    directory = pytester.mkdir("g")
    (directory / "guests.toml").write_text('[[guest]]\nname = "one"\nimage = "one.bin"\n')
    pytester.makepyfile(test_plain="def test_plain(): pass")
    # Like testpaths, the default applies only when no paths are given.
    result = pytester.runpytest("--co", "-q")
    result.stdout.fnmatch_lines_random(["g/guests.toml::one", "test_plain.py::test_plain"])
    result = pytester.runpytest("--co", "-q", "test_plain.py")
    assert "g/guests.toml" not in result.stdout.str()
    result = pytester.runpytest("--co", "-q", "g")
    result.stdout.fnmatch_lines(["g/guests.toml::one"])


def test_tool_kvmpy_typo_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml('[tool.kvmpy]\nguest = "g"\n')
    result = pytester.runpytest("--co")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "[tool.kvmpy]: unknown setting(s) guest (known: guests)" in result.stderr.str()


@pytest.mark.kvm
def test_under_xdist_each_worker_owns_its_machines(
    pytester: pytest.Pytester, assemble: Assembler
) -> None:
    pytest.importorskip("xdist")
    guests_dir(pytester.path, assemble)
    echo = assemble(ECHO)
    pytester.makepyfile(
        f"""
        import os
        import pytest

        @pytest.mark.parametrize("name", ["ann", "bob", "cy", "dee"])
        def test_echo(kvm_machine, name):
            assert os.environ["PYTEST_XDIST_WORKER"].startswith("gw")
            m = kvm_machine({str(echo)!r}, mem="16M")
            m.start()
            m.serial.expect(b"login: ")
            m.serial.send(name + "\\n")
            m.serial.expect(f"hello, {{name}}\\n")
            assert m.wait().status == 1
        """
    )
    result = pytester.runpytest("-p", "xdist", "-n", "2", "--kvm-guests=guests")
    result.assert_outcomes(passed=5, failed=2, skipped=1)
    result.stdout.fnmatch_lines(["*- kvm machine 1 (crashes.bin): crash, status 4 -*"])


@pytest.mark.parametrize("accel", ["soft", "auto"])
def test_kvm_accel_runs_kvm_machine_guests_without_kvm(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, accel: str
) -> None:
    # With /dev/kvm unusable, soft (and auto, falling back to it) still run the
    # fixture's guests; only the `kvm`-marked test is skipped, with the reason.
    pytest.importorskip("unicorn", reason="the software backend needs kvmpy[soft] (unicorn)")
    monkeypatch.delenv("KVMPY_REQUIRE_KVM", raising=False)
    image = guest("real_hello")
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.kvm
        def test_marked():
            pass

        def test_fixture(kvm_machine):
            result = kvm_machine({str(image)!r}, mem="16M").run()
            assert (result.status, result.exit_code) == (1, 0)
            assert result.output.startswith(b"Hello from real mode!")

        def test_backend_argument(kvm_machine):
            machine = kvm_machine({str(image)!r}, mem="16M", backend="soft")
            assert machine.machine.backend.name == "soft"
        """
    )
    result = pytester.runpytest(f"--kvm-accel={accel}", "--kvm-device=/nonexistent/kvm", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*KVM is unusable: open /nonexistent/kvm failed*"])


def test_a_guest_that_needs_the_irqchip_is_skipped_on_the_soft_backend(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("unicorn", reason="the software backend needs kvmpy[soft] (unicorn)")
    monkeypatch.delenv("KVMPY_REQUIRE_KVM", raising=False)
    image = guest("real_hello")
    pytester.makefile(
        ".toml",
        guests=f"""
        [[guest]]
        name = "plain"
        image = {str(image)!r}

        [[guest]]
        name = "acpi"
        image = {str(image)!r}
        irqchip = true
        """,
    )
    result = pytester.runpytest("--kvm-guests=.", "--kvm-accel=soft", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*it needs the irqchip, which the software backend lacks*"])
    bad_entry = f'[[guest]]\nname = "x"\nimage = {str(image)!r}\nirqchip = 1\n'
    pytester.makefile(".toml", guests=bad_entry)
    bad = pytester.runpytest("--kvm-guests=.", "--kvm-accel=soft")
    assert bad.ret != 0
    bad.stdout.fnmatch_lines(["*irqchip must be bool, not 1*"])
