"""The commands beyond trace and report: the release gate, worst-case search, detection power."""
