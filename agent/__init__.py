"""The in-VM agent (issue: the in-VM agent). Not built yet."""
