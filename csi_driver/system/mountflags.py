"""Mount flags from a request: which are allowed, which belong to the mount and which to the
filesystem, which say read-only or writable, and whether an existing mount already carries
them.

A flag string is untrusted: one entry may hold several comma-separated options, and mount(8)
knows options that are operations (``bind``, ``remount``, ``loop=``) rather than flags. Only
flags pass; an operation is refused, never executed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from csi_driver.system.mountcalls import MOUNT_FLAGS

#: options that are operations or helpers of mount(8), not flags: never from a request
_FORBIDDEN = frozenset(
    {
        "bind",
        "rbind",
        "move",
        "remount",
        "loop",
        "owner",
        "group",
        "user",
        "users",
        "shared",
        "rshared",
        "slave",
        "rslave",
        "private",
        "rprivate",
        "unbindable",
        "runbindable",
    }
)
_FORBIDDEN_PREFIXES = (
    "loop=",
    "offset=",
    "sizelimit=",
    "encryption=",
    "helper=",
    "make-",
    "x-",
    "X-",
)
#: fstab words that mean "nothing" to the kernel: dropped
_USERSPACE_ONLY = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev"})
MAX_OPTION_BYTES = 256

#: flags mountinfo shows when set, and the flags whose setting shows as the absence of another
_SHOWN = frozenset(
    {"ro", "rw", "nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime", "nosymfollow"}
)
_NEGATIONS = {
    "suid": "nosuid",
    "dev": "nodev",
    "exec": "noexec",
    "diratime": "nodiratime",
    "symfollow": "nosymfollow",
}


def parse(flags: Iterable[str]) -> list[str]:
    """The flags as single options (an entry ``"a,b"`` counts as two), each checked; a
    ValueError names the first one refused."""
    out: list[str] = []
    for flag in flags:
        for opt in flag.split(","):
            opt = opt.strip()
            if not opt:
                raise ValueError("a mount flag holds an empty option")
            if len(opt.encode()) > MAX_OPTION_BYTES:
                raise ValueError(f"a mount flag is longer than {MAX_OPTION_BYTES} bytes")
            if opt in _FORBIDDEN or opt.startswith(_FORBIDDEN_PREFIXES):
                raise ValueError(f"{opt!r} is a mount operation, not a mount flag")
            if any(c.isspace() or c in "\x00\\" for c in opt):
                raise ValueError(f"{opt!r} contains white space or a control character")
            if opt not in out and opt not in _USERSPACE_ONLY:
                out.append(opt)
    return out


def per_mount(flags: Sequence[str]) -> list[str]:
    """The flags that belong to the mount (``nosuid``, ``noatime``...), in order."""
    return [f for f in flags if f in MOUNT_FLAGS]


def per_filesystem(flags: Sequence[str]) -> list[str]:
    """The flags that belong to the filesystem (``discard``, ``errors=remount-ro``...)."""
    return [f for f in flags if f not in MOUNT_FLAGS]


def missing(flags: Sequence[str], options: Sequence[str]) -> list[str]:
    """The per-mount flags asked for that an existing mount (its mountinfo options) lacks."""
    return [
        f
        for f in flags
        if (f in _SHOWN and f not in options) or (f in _NEGATIONS and _NEGATIONS[f] in options)
    ]


def without_access(flags: Sequence[str]) -> list[str]:
    """The flags without ``ro`` and ``rw``: whether a mount is read-only is decided for each
    publication (see :func:`access`), never by the flags a volume was staged with."""
    return [f for f in flags if f not in ("ro", "rw")]


def access(read_only: bool) -> str:
    """The flag that makes a mount read-only or writable."""
    return "ro" if read_only else "rw"
