"""Kernels: what a spec names, fetched or built, unpacked and cached (``fetch``).

A spec is what a user types wherever kvmlab wants a kernel:

- ``debian:<suite>``: the newest cloud kernel of that Debian suite
  (``debian:bullseye`` is 5.10, ``debian:bookworm`` 6.1, ``debian:trixie`` 6.12);
- ``debian:<package>``: an exact image package, e.g. ``debian:linux-image-5.10.0-32-cloud-amd64``;
- ``local:<tree>[,modules=<INSTALL_MOD_PATH>]``: a kernel built from a source tree;
- ``kvm-modules:<debian spec>[+<patch, mbox or directory>]``: a Debian kernel with its
  KVM modules rebuilt from its own source, patched or not.

One module a source: ``debian``, ``local``, ``kvm_modules``; ``model`` is the Kernel
they all return, ``build`` compiles a tree for ``local:``, ``patches`` reads a series,
``paths`` reads the paths a user typed.
"""

from kvmlab.errors import UnknownSpec
from kvmlab.kernels import debian, kvm_modules, local
from kvmlab.kernels.model import Kernel

SPEC_HELP = ("debian:<suite> | debian:<linux-image package> | local:<tree>[,modules=<dir>] | "
             "kvm-modules:<debian spec>[+<patches>]")


def fetch(spec: str, debuginfo: bool = False) -> Kernel:
    """Resolve ``spec`` to a kernel on disk, downloading, unpacking or building it if needed."""
    scheme, _, rest = spec.partition(":")
    if scheme == "debian" and rest:
        return debian.fetch(spec, rest, debuginfo)
    if scheme == "local" and rest:
        return local.load(spec, rest, debuginfo)
    if scheme == "kvm-modules" and rest:
        return kvm_modules.load(spec, rest, debuginfo)
    raise UnknownSpec(f"unknown kernel spec {spec!r}; expected {SPEC_HELP}")
