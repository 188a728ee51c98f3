"""drgn scripts that read a running kernel's KVM structures (see the memslot issue)."""
