"""What the traces library raises: one base class, so a caller catches one thing."""


class TraceError(Exception):
    """Input the traces library cannot use (a damaged trace file, a bad probe set), said in one line."""
