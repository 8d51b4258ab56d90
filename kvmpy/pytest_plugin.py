"""kvmpy's pytest plugin: hardware-backed tests of guest kernels under KVM.

Installed with kvmpy, it is loaded by pytest through the ``pytest11`` entry
point (``-p no:kvmpy`` turns it off).  It gives

- the ``kvm_machine`` fixture, a factory of :class:`TestMachine`: a guest
  loaded from an image, with pexpect-like serial helpers, always closed at
  the end of the test;
- the ``kvm`` marker: a test marked with it, or using ``kvm_machine``, is
  skipped when /dev/kvm is unusable, and fails instead when
  ``KVMPY_REQUIRE_KVM=1`` (as in CI);
- ``--kvm-timeout SECONDS``: how long a guest may run (default 60; 0: no limit);
- ``--kvm-accel kvm|soft|auto``: who runs the guests (soft: the CPU emulator, no
  /dev/kvm needed; auto: KVM when usable); ``kvm_machine(image, backend="soft")``
  picks it for one machine;
- ``--kvm-guests DIR`` (or ``[tool.kvmpy] guests = "DIR"`` in pyproject.toml):
  each guest image in DIR, or each ``[[guest]]`` of DIR/guests.toml, becomes a
  test item, judged by the kvm-unit-tests convention (debug-exit code 0 passes,
  38 skips, anything else fails);
- on failure, the serial output and the vCPU state (registers, disassembly)
  of each machine the test used, as sections of the test's report.

Nothing is shared between tests or processes, so ``pytest -n auto``
(pytest-xdist) works: each worker builds and owns its own VMs.
See docs/testing.md.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from kvmpy.backends.base import BACKENDS, KVM_PATH, BackendError, open_backend
from kvmpy.loaders import LoaderError
from kvmpy.loaders.detect import FORMATS
from kvmpy.memory import parse_size
from kvmpy.records import Record
from kvmpy.testing import (
    GuestStopped,
    RunResult,
    ScreenTimeout,
    SerialConsole,
    SerialTimeout,
    TestMachine,
    TextScreenConsole,
    format_tail,
    guest_results,
    load_machine,
)
from kvmpy.x86.modes import MODES

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr, TracebackStyle

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no TOML parser of its own
    import tomli as tomllib

__all__ = [
    "GUEST_PASS_STATUS",
    "GUEST_SKIP_CODE",
    "GUEST_SKIP_STATUS",
    "GuestFailed",
    "GuestItem",
    "GuestSpec",
    "GuestStopped",
    "MachineFactory",
    "RunResult",
    "ScreenTimeout",
    "SerialConsole",
    "SerialTimeout",
    "TestMachine",
    "TextScreenConsole",
    "kvm_machine",
]

DEFAULT_TIMEOUT = 60.0
REQUIRE_KVM_ENV = "KVMPY_REQUIRE_KVM"
# The kvm-unit-tests convention over QEMU's isa-debug-exit: code 0 (status 1)
# passes, code 38 (status 77) skips, anything else fails.
GUEST_PASS_STATUS = 1
GUEST_SKIP_CODE = 38
GUEST_SKIP_STATUS = (GUEST_SKIP_CODE << 1) | 1
GUESTS_TOML = "guests.toml"
IMAGE_SUFFIXES = (".bin", ".elf")


class MachineFactory(Protocol):
    """The type of the ``kvm_machine`` fixture."""

    def __call__(
        self,
        image: str | os.PathLike[str],
        *,
        mem: int | str = ...,
        cpus: int = ...,
        append: str = ...,
        modules: Sequence[str | tuple[str, str]] = ...,
        initrd: str | os.PathLike[str] | None = ...,
        mode: str | None = ...,
        image_format: str | None = ...,
        load_addr: int | None = ...,
        entry: int | None = ...,
        timeout: float | None = ...,
        **machine_kwargs: Any,
    ) -> TestMachine: ...


# -- KVM availability ----------------------------------------------------------------------

_KVM_PROBLEM = pytest.StashKey[tuple[str | None]]()
_MACHINES = pytest.StashKey[list[TestMachine]]()
_GUESTS_DIR = pytest.StashKey[Path | None]()
_SKIPPED_FOR_KVM = pytest.StashKey[bool]()


def kvm_problem(config: pytest.Config) -> str | None:
    """Why KVM is unusable (None if usable); asked once per process."""
    cached = config.stash.get(_KVM_PROBLEM, None)
    if cached is None:
        try:
            open_backend("kvm", path=config.getoption("kvm_device")).close()
            cached = (None,)
        except (BackendError, ImportError) as exc:
            cached = (str(exc),)
        config.stash[_KVM_PROBLEM] = cached
    return cached[0]


def accel(config: pytest.Config) -> str:
    """The backend machines get: --kvm-accel, with auto resolved (KVM if usable, else soft)."""
    chosen = str(config.getoption("kvm_accel"))
    if chosen == "auto":
        return "kvm" if kvm_problem(config) is None else "soft"
    return chosen


def needs_kvm(item: pytest.Item) -> bool:
    if item.get_closest_marker("kvm") is not None:
        return True
    machines = "kvm_machine" in getattr(item, "fixturenames", ()) or isinstance(item, GuestItem)
    return machines and accel(item.config) == "kvm"


# -- hooks -------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmpy", "kvmpy: guest kernels under KVM")
    group.addoption(
        "--kvm-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"stop a guest that runs longer (default {DEFAULT_TIMEOUT:g}; 0: no limit)",
    )
    group.addoption(
        "--kvm-guests",
        metavar="DIR",
        default=None,
        help="collect the guest images in DIR, or the [[guest]] entries of DIR/guests.toml, "
        'as tests (default: [tool.kvmpy] guests = "DIR" in pyproject.toml)',
    )
    group.addoption(
        "--kvm-device",
        metavar="PATH",
        default=KVM_PATH,
        help=f"the KVM device (default {KVM_PATH})",
    )
    group.addoption(
        "--kvm-accel",
        choices=BACKENDS,
        default="kvm",
        help="who runs kvm_machine guests: kvm, soft (the CPU emulator, no /dev/kvm) or auto "
        "(KVM if usable); a test can still pass backend= to kvm_machine",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kvm: the test needs a usable /dev/kvm (skipped without one, failed instead "
        f"when {REQUIRE_KVM_ENV}=1)",
    )
    timeout = config.getoption("kvm_timeout")
    if timeout is None or timeout < 0:
        raise pytest.UsageError(f"--kvm-timeout must be 0 or more seconds, not {timeout}")
    option = config.getoption("kvm_guests")
    if option is not None:
        guests = (config.invocation_params.dir / option).resolve()
        source = "--kvm-guests"
    else:
        guests, source = _configured_guests_dir(config)
    if guests is not None and not guests.is_dir():
        raise pytest.UsageError(f"{source}: {guests} is not a directory")
    config.stash[_GUESTS_DIR] = guests
    # Like testpaths, the pyproject default only applies when no paths are given.
    explicit_args = config.args_source == pytest.Config.ArgsSource.ARGS
    if guests is not None and (option is not None or not explicit_args):
        config.args.append(str(guests))


def _configured_guests_dir(config: pytest.Config) -> tuple[Path | None, str]:
    """``[tool.kvmpy] guests`` from the project's pyproject.toml, relative to it."""
    inipath = config.inipath
    pyproject = (
        inipath if inipath is not None and inipath.name == "pyproject.toml" else None
    ) or config.rootpath / "pyproject.toml"
    if not pyproject.is_file():
        return None, ""
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise pytest.UsageError(f"{pyproject}: {exc}") from None
    settings = data.get("tool", {}).get("kvmpy")
    if settings is None:
        return None, ""
    source = f"{pyproject}: [tool.kvmpy]"
    if not isinstance(settings, dict):
        raise pytest.UsageError(f"{source} must be a table")
    unknown = set(settings) - {"guests"}
    if unknown:
        names = ", ".join(sorted(unknown))
        raise pytest.UsageError(f"{source}: unknown setting(s) {names} (known: guests)")
    guests = settings.get("guests")
    if guests is None:
        return None, ""
    if not isinstance(guests, str):
        raise pytest.UsageError(f"{source} guests must be a path string, not {guests!r}")
    return (pyproject.parent / guests).resolve(), f"{source} guests"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip tests that need KVM when it is unusable, or fail them when KVMPY_REQUIRE_KVM=1."""
    if not needs_kvm(item):
        return
    problem = kvm_problem(item.config)
    if problem is None:
        return
    if os.environ.get(REQUIRE_KVM_ENV) == "1":
        pytest.fail(f"{REQUIRE_KVM_ENV}=1 but KVM is unusable: {problem}", pytrace=False)
    item.stash[_SKIPPED_FOR_KVM] = True
    pytest.skip(f"KVM is unusable: {problem}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach each machine's serial output and vCPU state to a failed test's report."""
    report = yield
    if isinstance(item, GuestItem) and call.when == "call" and item.results:
        lines = [f"{kind}: {name}" for kind, name in item.results]
        report.sections.append((f"guest results of {item.name}", "\n".join(lines)))
    skipped_here = item.stash.get(_SKIPPED_FOR_KVM, False) or isinstance(item, GuestItem)
    if report.skipped and skipped_here and isinstance(report.longrepr, tuple):
        # Point at the test (or the guest's entry), not at this plugin's skip() call.
        line = item.location[1]
        report.longrepr = (item.location[0], 1 if line is None else line + 1, report.longrepr[2])
    if report.failed:
        machines: list[TestMachine] = item.stash.get(_MACHINES, [])
        for index, machine in enumerate(machines, 1):
            report.sections.extend(machine.report_sections(f"kvm machine {index}"))
    return report


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    guests = parent.config.stash.get(_GUESTS_DIR, None)
    if guests is None or file_path.parent.resolve() != guests:
        return None
    if file_path.name == GUESTS_TOML:
        return GuestsToml.from_parent(parent, path=file_path)
    if file_path.suffix in IMAGE_SUFFIXES and not (guests / GUESTS_TOML).exists():
        return GuestImage.from_parent(parent, path=file_path)
    return None


# -- the fixture ---------------------------------------------------------------------------


def new_machine(item: pytest.Item, image: str | os.PathLike[str], **kwargs: Any) -> TestMachine:
    """:func:`~kvmpy.testing.load_machine`, with the test run's defaults, tracked for
    ``item``'s failure report.  ``timeout=None`` means ``--kvm-timeout``; 0, no limit.
    """
    if kwargs.get("timeout") is None:
        kwargs["timeout"] = item.config.getoption("kvm_timeout")
    kwargs["timeout"] = kwargs["timeout"] or None
    kwargs.setdefault("kvm_path", item.config.getoption("kvm_device"))
    kwargs.setdefault("backend", accel(item.config))
    machine = load_machine(image, **kwargs)
    item.stash.setdefault(_MACHINES, []).append(machine)
    return machine


@pytest.fixture
def kvm_machine(request: pytest.FixtureRequest) -> Iterator[MachineFactory]:
    """kvm_machine(image, *, mem="128M", cpus=1, append="", ...) -> TestMachine.

    Loads a multiboot kernel, an ELF executable or a flat binary (real mode
    at 0x7c00 unless ``mode`` says otherwise), as ``kvmpy run`` does.  Every
    machine is closed when the test ends, passed or failed.
    """
    made: list[TestMachine] = []

    def factory(image: str | os.PathLike[str], **kwargs: Any) -> TestMachine:
        machine = new_machine(request.node, image, **kwargs)
        made.append(machine)
        return machine

    yield factory
    errors: list[BaseException] = []
    for machine in made:
        try:
            machine.close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


# -- the guest runner ----------------------------------------------------------------------


class GuestFailed(AssertionError):
    """A guest did not end as expected; the message says how it ended."""


class GuestSpec(Record):
    """One guest test: an image and how to run it (an entry of guests.toml)."""

    name: str
    image: Path
    append: str = ""
    cpus: int = 1
    mem: int | str = "128M"
    # True: the guest needs the in-kernel irqchip (and the ACPI/MP tables that come with it).
    irqchip: bool = False
    mode: str | None = None
    image_format: str | None = None
    load_addr: int | None = None
    timeout: float | None = None
    # None: the convention (status 1 passes, 77 skips); else the status that passes.
    expect_status: int | None = None
    # A regex the serial output must match (re.search, multiline).
    expect_output: str | None = None
    source: str = ""
    line: int = 1  # of the [[guest]] header in guests.toml (1-based)


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "image": (str,),
    "append": (str,),
    "args": (str,),
    "cpus": (int,),
    "irqchip": (bool,),
    "mem": (int, str),
    "mode": (str,),
    "format": (str,),
    "load_addr": (int,),
    "timeout": (int, float),
    "expect_status": (int,),
    "expect_output": (str,),
}


def parse_guest(entry: object, base: Path, where: str, line: int = 1) -> GuestSpec:
    """Validate one ``[[guest]]`` table; ``image`` is relative to ``base``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a [[guest]] entry must be a table")
    unknown = set(entry) - set(_SPEC_TYPES)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(_SPEC_TYPES)})"
        )
    for key, value in entry.items():
        types = _SPEC_TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{where}: {key} must be {wanted}, not {value!r}")
    for key in ("name", "image"):
        if key not in entry:
            raise ValueError(f"{where}: {key} is required")
    if "args" in entry and "append" in entry:
        raise ValueError(f"{where}: give append or args, not both")
    spec = GuestSpec(
        name=entry["name"],
        image=base / entry["image"],
        append=entry.get("append") or entry.get("args") or "",
        cpus=entry.get("cpus", 1),
        irqchip=entry.get("irqchip", False),
        mem=str(entry.get("mem", "128M")),  # a TOML integer is MiB, as QEMU's -m
        mode=entry.get("mode"),
        image_format=entry.get("format"),
        load_addr=entry.get("load_addr"),
        timeout=entry.get("timeout"),
        expect_status=entry.get("expect_status"),
        expect_output=entry.get("expect_output"),
        source=where,
        line=line,
    )
    if not re.fullmatch(r"[\w.+-]+", spec.name):
        raise ValueError(f"{where}: name {spec.name!r} must be letters, digits, _ . + -")
    if spec.cpus < 1:
        raise ValueError(f"{where}: cpus must be at least 1")
    if spec.mode is not None and spec.mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {', '.join(MODES)}")
    if spec.image_format is not None and spec.image_format not in FORMATS:
        raise ValueError(f"{where}: format must be one of {', '.join(FORMATS)}")
    if spec.timeout is not None and spec.timeout <= 0:
        raise ValueError(f"{where}: timeout must be positive")
    if isinstance(spec.mem, str):
        parse_size(spec.mem)  # raises ValueError with a clear message
    if spec.expect_output is not None:
        try:
            re.compile(spec.expect_output)
        except re.error as exc:
            raise ValueError(f"{where}: expect_output is not a regex: {exc}") from None
    return spec


_GUEST_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*guest[ \t]*\]\]", re.MULTILINE)


class GuestsToml(pytest.File):
    """DIR/guests.toml: one test per ``[[guest]]``."""

    def collect(self) -> Iterator[GuestItem]:
        try:
            text = self.path.read_text()
            data = tomllib.loads(text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise self.CollectError(f"{self.path}: {exc}") from None
        unknown = set(data) - {"guest"}
        if unknown:
            raise self.CollectError(
                f"{self.path}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                "(write guests as [[guest]] tables)"
            )
        entries = data.get("guest", [])
        if not isinstance(entries, list):
            raise self.CollectError(f"{self.path}: guest must be an array of [[guest]] tables")
        # Where each [[guest]] starts, for reports (guests given inline stay at line 1).
        headers = [text.count("\n", 0, m.start()) + 1 for m in _GUEST_HEADER.finditer(text)]
        if len(headers) != len(entries):
            headers = [1] * len(entries)
        seen: set[str] = set()
        for index, (entry, line) in enumerate(zip(entries, headers, strict=True), 1):
            try:
                where = f"{self.path}:{line}: guest #{index}"
                spec = parse_guest(entry, self.path.parent, where, line)
            except ValueError as exc:
                raise self.CollectError(str(exc)) from None
            if spec.name in seen:
                raise self.CollectError(f"{self.path}: two guests are named {spec.name!r}")
            seen.add(spec.name)
            yield GuestItem.from_parent(self, name=spec.name, spec=spec)


class GuestImage(pytest.File):
    """A guest image file in DIR (without guests.toml): *.bin flat real mode, *.elf detected."""

    def collect(self) -> Iterator[GuestItem]:
        spec = GuestSpec(
            name=self.path.stem,
            image=self.path,
            mode="real" if self.path.suffix == ".bin" else None,
            image_format="flat" if self.path.suffix == ".bin" else None,
            source=str(self.path),
        )
        yield GuestItem.from_parent(self, name=spec.name, spec=spec)


class GuestItem(pytest.Item):
    """Run one guest and judge it by its exit status (and output, if asked)."""

    def __init__(self, *, spec: GuestSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.results: list[tuple[str, str]] = []
        self.machine: TestMachine | None = None

    def runtest(self) -> None:
        spec = self.spec
        if not spec.image.exists():
            raise GuestFailed(f"{spec.image} does not exist (is the guest built?)")
        if accel(self.config) == "soft" and (spec.cpus > 1 or spec.irqchip):
            need = f"{spec.cpus} vCPUs need SMP" if spec.cpus > 1 else "it needs the irqchip"
            pytest.skip(f"{need}, which the software backend lacks")
        self.machine = new_machine(
            self,
            spec.image,
            mem=spec.mem,
            cpus=spec.cpus,
            append=spec.append,
            mode=spec.mode,
            image_format=spec.image_format,
            load_addr=spec.load_addr,
            timeout=spec.timeout,
        )
        result = self.machine.run()
        self.results = guest_results(result.output)
        self.user_properties.extend(("guest result", f"{k}: {n}") for k, n in self.results)
        judge(spec, result, self.results)

    def teardown(self) -> None:
        if self.machine is not None:
            self.machine.close()

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: TracebackStyle | None = None,
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, (GuestFailed, LoaderError, BackendError, ValueError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, self.spec.line - 1, f"guest {self.name}"


def judge(spec: GuestSpec, result: RunResult, results: list[tuple[str, str]]) -> None:
    """Pass, skip (pytest.skip) or fail (GuestFailed) a finished guest."""
    status = result.status
    how = result.message
    if spec.expect_status is None and status == GUEST_SKIP_STATUS:
        skips = "; ".join(name for kind, name in results if kind == "SKIP")
        pytest.skip(f"{spec.name}: guest skipped ({how})" + (f": {skips}" if skips else ""))
    problems: list[str] = []
    wanted = GUEST_PASS_STATUS if spec.expect_status is None else spec.expect_status
    if status != wanted:
        expected = (
            "exit code 0 (status 1)"
            if spec.expect_status is None
            else f"status {spec.expect_status}"
        )
        problems.append(f"expected {expected}, but {how}")
    # Serial consoles often end lines with CRLF: let "$" match before either.
    text = result.text.replace("\r\n", "\n")
    if spec.expect_output is not None and not re.search(spec.expect_output, text, re.MULTILINE):
        problems.append(f"the output does not match {spec.expect_output!r}")
    if not problems:
        return
    lines = [f"guest {spec.name} ({spec.image.name}): {'; '.join(problems)}"]
    if result.report is not None:
        lines.append(result.report.summary())
    if results:
        counts = {kind: sum(1 for k, _ in results if k == kind) for kind, _ in results}
        lines.append("guest results: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
        lines.extend(f"  {kind}: {name}" for kind, name in results if kind in ("FAIL", "XPASS"))
    lines.append(format_tail(result.output, 1024))
    raise GuestFailed("\n".join(lines))
