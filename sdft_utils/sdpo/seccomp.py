"""A seccomp filter for sandboxed programs, as the raw classic-BPF bytes that `bwrap --seccomp FD` loads.

What it refuses (each an error the program sees, never a crash of the sandbox):
- new processes: `fork`, `vfork`, and `clone` without CLONE_THREAD (threads still work; `clone3` answers ENOSYS,
  so the C library falls back to `clone`, whose flags a classic filter can read). One process per run is what
  makes the per-process limits (address space, CPU seconds) limits of the whole run;
- reaching other processes: `ptrace`, `process_vm_readv`/`writev`, `pidfd_open`/`getfd`/`send_signal`;
- leaving the run's process group (`setsid`, `setpgid`): one SIGKILL to that group ends everything in the run;
- sockets other than unix ones (and `io_uring`, which can open sockets without the `socket` call);
- memory outside the address space, which RLIMIT_AS does not count: `memfd_create`/`memfd_secret` files, SysV
  shared memory segments (they outlive a detach) and message queues;
- kernel interfaces a program never needs: `bpf`, `perf_event_open`, `userfaultfd`, the keyring calls.
A call made through another architecture's entry (32-bit calls from a 64-bit program, x32) kills the program.

Built by hand (no libseccomp): a filter is a list of 8-byte `struct sock_filter` instructions.
"""

from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (little-endian on both arches)
NR_OFFSET, ARCH_OFFSET, ARG0_OFFSET = 0, 4, 16

LOAD_WORD = 0x20  # BPF_LD | BPF_W | BPF_ABS
JUMP_EQUAL, JUMP_AT_LEAST, JUMP_ANY_BIT = 0x15, 0x35, 0x45  # BPF_JMP | BPF_JEQ / BPF_JGE / BPF_JSET, BPF_K
RETURN = 0x06  # BPF_RET | BPF_K

KILL_PROCESS, ALLOW = 0x80000000, 0x7FFF0000


def _error(number: int) -> int:
    return 0x00050000 | number  # SECCOMP_RET_ERRNO


CLONE_THREAD = 0x00010000
AF_UNIX = 1
X32_BIT = 0x40000000

# (audit arch, syscall numbers) per machine; the names are the kernel's
ARCHES = {
    "x86_64": (0xC000003E, {
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "socket": 41, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249, "memfd_create": 319,
        "memfd_secret": 447, "shmget": 29, "msgget": 68, "setsid": 112, "setpgid": 109}),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "socket": 198, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 280, "perf_event_open": 241,
        "userfaultfd": 282, "keyctl": 219, "add_key": 217, "request_key": 218, "memfd_create": 279,
        "memfd_secret": 447, "shmget": 194, "msgget": 186, "setsid": 157, "setpgid": 154}),
}
REFUSED = ("fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd",
           "pidfd_send_signal", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
           "userfaultfd", "keyctl", "add_key", "request_key", "memfd_create", "memfd_secret", "shmget", "msgget",
           "setsid", "setpgid")


def _op(code: int, k: int = 0, jump_true: int = 0, jump_false: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jump_true, jump_false, k)


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The filter for `machine` (default: this one), or None where we have no syscall table for it."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        return None
    audit_arch, numbers = ARCHES[machine]
    program = [
        _op(LOAD_WORD, ARCH_OFFSET),
        _op(JUMP_EQUAL, audit_arch, 1, 0),
        _op(RETURN, KILL_PROCESS),
        _op(LOAD_WORD, NR_OFFSET),
    ]
    if machine == "x86_64":  # x32 calls reach the same kernel code under numbers with this bit set
        program += [_op(JUMP_AT_LEAST, X32_BIT, 0, 1), _op(RETURN, _error(errno.EPERM))]
    for name in REFUSED:
        if name in numbers:  # "if nr == N: return EPERM", the accumulator keeps nr when the jump skips
            program += [_op(JUMP_EQUAL, numbers[name], 0, 1), _op(RETURN, _error(errno.EPERM))]
    # clone3 passes its flags in memory, which a filter cannot read: say "no such call" so libc uses clone
    program += [_op(JUMP_EQUAL, numbers["clone3"], 0, 1), _op(RETURN, _error(errno.ENOSYS))]
    # clone: threads only. socket: unix domain only. Both blocks return, so A still holds nr when skipped.
    program += [
        _op(JUMP_EQUAL, numbers["clone"], 0, 4),
        _op(LOAD_WORD, ARG0_OFFSET),
        _op(JUMP_ANY_BIT, CLONE_THREAD, 0, 1),
        _op(RETURN, ALLOW),
        _op(RETURN, _error(errno.EPERM)),
        _op(JUMP_EQUAL, numbers["socket"], 0, 4),
        _op(LOAD_WORD, ARG0_OFFSET),
        _op(JUMP_EQUAL, AF_UNIX, 0, 1),
        _op(RETURN, ALLOW),
        _op(RETURN, _error(errno.EAFNOSUPPORT)),
        _op(RETURN, ALLOW),
    ]
    return b"".join(program)
