"""The seccomp rules as data, and their compilation through libseccomp (no process is filtered here)."""

from __future__ import annotations

import errno

from aube.controlplane.runtimes import seccomp


def _rules_for(name: str) -> list[seccomp.Rule]:
    return [r for r in seccomp.RULES if r.syscall == name]


def test_the_dangerous_calls_are_refused_outright() -> None:
    for name in ("mount", "umount2", "ptrace", "unshare", "setns", "bpf", "keyctl", "kexec_load", "init_module",
                 "perf_event_open", "open_by_handle_at", "userfaultfd", "process_vm_readv", "pivot_root"):  # fmt: skip
        (rule,) = _rules_for(name)
        assert rule.errno == errno.EPERM and rule.compare == ()


def test_clone_only_with_a_namespace_flag() -> None:
    rules = _rules_for("clone")
    flags = {c.value for r in rules for c in r.compare}
    assert flags == set(seccomp.CLONE_NAMESPACE_FLAGS)
    assert all(len(r.compare) == 1 and r.compare[0].op == "masked_eq" and r.compare[0].arg == 0 for r in rules)
    # clone3 hides its flags from the filter: ENOSYS makes glibc use clone.
    assert [r.errno for r in _rules_for("clone3")] == [errno.ENOSYS]


def test_mknod_only_of_devices() -> None:
    kinds = {(r.syscall, c.arg, c.value) for r in seccomp.RULES for c in r.compare if r.syscall.startswith("mknod")}
    assert kinds == {("mknod", 1, 0o020000), ("mknod", 1, 0o060000), ("mknodat", 2, 0o020000), ("mknodat", 2, 0o060000)}


def test_compiles_to_bpf() -> None:
    program = seccomp.compile_bpf()
    assert program and len(program) % 8 == 0  # struct sock_filter is 8 bytes
