"""The guest's side of kvmlab (installed as the ``kvmlab_guest`` package).

``protocol`` is the host↔guest contract, imported by both sides; ``init`` runs as the
guest's PID 1, ``agent`` serves a guest that stays up; the ``*.toml`` recipes say what
goes into the guest image. Everything here runs in the guest on the standard library
only, and travels into the initramfs as this whole package.
"""
