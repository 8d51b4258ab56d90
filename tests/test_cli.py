"""Command-line parsing and host-info formatting, without /dev/kvm."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy.backends.kvm.hostinfo import HostInfo, format_info
from kvmpy.cli import build_parser
from kvmpy.hostinfo import cpuinfo_fields, kvm_modules


def test_run_defaults() -> None:
    args = build_parser().parse_args(["run", "image.bin"])
    assert (args.mode, args.mem, args.load_addr, args.entry, args.timeout) == (
        None,
        128 << 20,
        None,
        None,
        None,
    )


def test_run_parses_sizes_and_addresses() -> None:
    args = build_parser().parse_args(
        ["run", "--mode", "long", "--mem", "1G", "--load-addr", "0x200000", "--entry", "2097168",
         "--timeout", "2.5", "k.bin"]
    )  # fmt: skip
    assert (args.mode, args.mem, args.load_addr, args.entry, args.timeout) == (
        "long",
        1 << 30,
        0x200000,
        2097168,
        2.5,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--mode", "smm", "x"], "invalid choice: 'smm'"),
        (["run", "--mem", "lots", "x"], "not a size: 'lots'"),
        (["run", "--load-addr", "here", "x"], "not an address: 'here'"),
        (["run", "--timeout", "-1", "x"], "timeout must be positive"),
        (["run"], "the following arguments are required: image"),
    ],
)
def test_bad_options_exit_2_with_one_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_kvm_modules_lists_backends(tmp_path: Path) -> None:
    for name in ("kvm", "kvm_pvm", "kvm_intel", "virtio"):
        (tmp_path / name).mkdir()
    assert kvm_modules(tmp_path) == ["kvm_intel", "kvm_pvm"]
    assert kvm_modules(tmp_path / "missing") == []


def test_cpuinfo_reads_the_first_processor(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vmx sse\n\n"
        "processor\t: 1\nvendor_id\t: Other\n"
    )
    assert cpuinfo_fields(cpuinfo) == {
        "processor": "0",
        "vendor_id": "GenuineIntel",
        "flags": "fpu vmx sse",
    }


def test_format_info_describes_known_modules() -> None:
    info = HostInfo(
        api_version=12,
        modules=["kvm_intel"],
        cpu_vendor="GenuineIntel",
        cpu_model="Xeon",
        virtualization_flags=["vmx"],
        vcpu_mmap_size=12288,
        capabilities={"IRQCHIP": 1, "PIT2": 0, "NR_VCPUS": 8},
    )
    text = format_info(info)
    assert "KVM module:        kvm_intel (Intel VT-x)" in text
    assert "  IRQCHIP                  yes" in text
    assert "  PIT2                     no" in text
    assert "  NR_VCPUS                 8" in text
