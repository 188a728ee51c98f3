"""ftrace around KVM selftests: probe sets, the guest-side capture (``traces.guest``) and
trace.dat reading (``tracedat``), standard library and pandas, nothing from kvmlab."""
