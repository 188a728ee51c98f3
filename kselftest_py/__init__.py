"""Guest-side KVM selftests for kvmlab: standard library only, run on the guest's python3."""
