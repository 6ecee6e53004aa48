"""The seccomp filter of sandboxed process instances, comparable to Docker's default profile.

Everything is allowed except the system calls below, which fail with EPERM: what a function needs none of and an
attacker would reach for first (mounting, namespaces, tracing other processes, loading kernel code, keyrings, the
clock, raw I/O ports, handles that bypass path permissions). `clone` is refused only with a namespace flag, so
threads and fork work; `clone3` passes its flags in memory a filter cannot read, so it answers ENOSYS, on which
glibc falls back to `clone` (as under Docker). Any other system call ABI than the machine's own (x86's 32-bit
`int 0x80` on x86_64, say) kills the process: the rules below only name the native numbers.

`RULES` is pure data (unit-tested); `compile_bpf` turns it into the BPF program bubblewrap loads with
`--seccomp FD` (through libseccomp, by the `pyseccomp` binding). The control plane compiles it once.
"""

from __future__ import annotations

import errno
import io
import stat

import msgspec

# Flags of clone(2) that create namespaces.
CLONE_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
FILE_TYPE_MASK = 0o170000  # S_IFMT (the `stat` module has it only as a function)
# personality(2) flags that weaken the process (no address randomisation, executable data, a page at 0...).
# libseccomp takes one comparison per argument and rule, so the flags are refused rather than values allowed;
# the query value 0xffffffff carries every flag, so it is refused too (nothing common asks).
PERSONALITY_FLAGS_DENIED = (
    0x0040000,
    0x0100000,
    0x0200000,
    0x0400000,
    0x0800000,
    0x1000000,
    0x2000000,
    0x4000000,
    0x8000000,
)

DENIED = (
    # mounts and file system roots
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "swapon", "swapoff", "quotactl", "quotactl_fd", "nfsservctl",
    # namespaces
    "unshare", "setns",
    # other processes' memory and execution
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # kernel code, the kernel's own interfaces
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf", "perf_event_open",
    "lookup_dcookie", "syslog", "reboot", "acct", "userfaultfd", "fanotify_init", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "uselib", "vhangup",
    # keyrings (not namespaced)
    "keyctl", "add_key", "request_key",
    # the clock
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    # raw I/O and legacy
    "iopl", "ioperm", "vm86", "vm86old", "modify_ldt",
    # handles that skip path permissions
    "open_by_handle_at", "name_to_handle_at",
    "sethostname", "setdomainname",
)  # fmt: skip


class Compare(msgspec.Struct, frozen=True):
    """One comparison of argument `arg`: `op` is "masked_eq" (arg & mask == value), "ne" or "eq"."""

    arg: int
    op: str
    value: int
    mask: int = 0


class Rule(msgspec.Struct, frozen=True):
    syscall: str
    errno: int
    compare: tuple[Compare, ...] = ()  # all must hold (an empty tuple: always)


def _rules() -> tuple[Rule, ...]:
    rules = [Rule(name, errno.EPERM) for name in DENIED]
    # Namespaces through clone's flags (arg 0).
    rules += [Rule("clone", errno.EPERM, (Compare(0, "masked_eq", flag, flag),)) for flag in CLONE_NAMESPACE_FLAGS]
    rules.append(Rule("clone3", errno.ENOSYS))
    # Device nodes: mknod's mode is arg 1, mknodat's arg 2 (fifos and plain files stay allowed).
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        rules.append(Rule("mknod", errno.EPERM, (Compare(1, "masked_eq", kind, FILE_TYPE_MASK),)))
        rules.append(Rule("mknodat", errno.EPERM, (Compare(2, "masked_eq", kind, FILE_TYPE_MASK),)))
    rules += [Rule("personality", errno.EPERM, (Compare(0, "masked_eq", f, f),)) for f in PERSONALITY_FLAGS_DENIED]
    return tuple(rules)


RULES = _rules()


def compile_bpf(rules: tuple[Rule, ...] = RULES) -> bytes:
    """The rules as a BPF program for this machine's architecture (libseccomp's `seccomp_export_bpf`)."""
    import pyseccomp

    ops = {"masked_eq": pyseccomp.MASKED_EQ, "ne": pyseccomp.NE, "eq": pyseccomp.EQ}
    seccomp_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    # Other ABIs (x86's 32-bit one on x86_64) would slip past native syscall numbers: kill instead.
    seccomp_filter.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for rule in rules:
        args = [
            pyseccomp.Arg(c.arg, ops[c.op], c.mask, c.value)
            if c.op == "masked_eq"
            else pyseccomp.Arg(c.arg, ops[c.op], c.value)
            for c in rule.compare
        ]
        try:
            seccomp_filter.add_rule(pyseccomp.ERRNO(rule.errno), rule.syscall, *args)
        except (ValueError, OSError) as e:
            # A name this architecture does not have (vm86 on x86_64, say) cannot be called here either.
            if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, rule.syscall) < 0:
                continue
            raise RuntimeError(f"seccomp rule for {rule.syscall} refused by libseccomp: {e}") from e
    out = io.BytesIO()
    export_to_memory(seccomp_filter, out)
    return out.getvalue()


def export_to_memory(seccomp_filter: object, out: io.BytesIO) -> None:
    """libseccomp exports to a file descriptor: through a memfd into bytes."""
    import os

    fd = os.memfd_create("aube-seccomp", os.MFD_CLOEXEC)
    try:
        with open(fd, "w+b", closefd=False) as f:
            seccomp_filter.export_bpf(f)  # type: ignore[attr-defined]
            f.seek(0)
            out.write(f.read())
    finally:
        os.close(fd)
