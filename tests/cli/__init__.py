"""The CLI tests (a package, so that their module names do not clash with tests/integration's
in pytest's prepend import mode)."""
