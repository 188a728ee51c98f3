"""ftrace capture recipes and trace.dat analysis (see the tracing issue)."""
