"""kvmlab: boot real kernels in QEMU with KVM inside and qualify KVM patches."""
