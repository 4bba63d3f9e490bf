"""The verifying proxy (issue: the verifying proxy). Not built yet."""
