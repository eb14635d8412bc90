"""Tools for the project's developers, not its users: mutation testing of the trust-critical code and the line
checks (docs/mutation.md)."""
