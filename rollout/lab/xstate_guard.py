"""Exec a User-Mode-Linux kernel that cannot trip over the host's AMX register state.

Run as a script (`python xstate_guard.py linux.uml ARGS...`), never imported by the package.

Why: UML 6.1 (Debian bookworm) saves and restores its guests' FPU registers with
`ptrace(PTRACE_{GET,SET}REGSET, NT_X86_XSTATE)` into a buffer sized for AVX-512. On a host CPU with AMX
the kernel's XSAVE area is ~11 KiB, the host refuses the short SETREGSET with EFAULT, and every guest
panics at its first user process ("ptrace set fp regs failed, errno = 14"). This installs a seccomp
filter that answers EIO to exactly those two ptrace requests; UML then falls back to
PTRACE_{GET,SET}FPREGS (x87/SSE state), which works. AVX registers are then not preserved for guest
processes (seen: ssh-keygen failing to load a key, kmod's insmod failing with EINVAL), so init.sh
(kernel argument lab.noavx=1) keeps glibc and OpenSSL off AVX in every guest process, sshd sessions
included.
"""

import ctypes
import os
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
NR_PTRACE = 101
PTRACE_GETREGSET, PTRACE_SETREGSET = 0x4204, 0x4205
NT_X86_XSTATE = 0x202
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, EIO = 0x7FFF0000, 0x00050000, 5
PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_SET_NO_NEW_PRIVS = 22, 2, 38


def _op(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


# seccomp_data: nr @0, arch @4, args[0] @16, args[2] @32 (low 32 bits, little-endian).
PROGRAM = b"".join([
    _op(LD_W_ABS, 0, 0, 4), _op(JEQ_K, 0, 8, AUDIT_ARCH_X86_64),   # other arch -> allow
    _op(LD_W_ABS, 0, 0, 0), _op(JEQ_K, 0, 6, NR_PTRACE),           # not ptrace -> allow
    _op(LD_W_ABS, 0, 0, 16), _op(JEQ_K, 1, 0, PTRACE_GETREGSET),
    _op(JEQ_K, 0, 3, PTRACE_SETREGSET),                              # other request -> allow
    _op(LD_W_ABS, 0, 0, 32), _op(JEQ_K, 0, 1, NT_X86_XSTATE),       # other regset -> allow
    _op(RET_K, 0, 0, SECCOMP_RET_ERRNO | EIO),
    _op(RET_K, 0, 0, SECCOMP_RET_ALLOW),
])


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    code = ctypes.create_string_buffer(PROGRAM, len(PROGRAM))
    prog = _Prog(len(PROGRAM) // 8, ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter not installed: {os.strerror(err)}")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])  # noqa: S606 - the lab's own kernel argv, no shell
