"""drgn helpers for a running kernel's KVM memslots: ``memslots`` walks them into the plain
records of ``memslot_model``, ``memslot_invariants`` checks those records."""
