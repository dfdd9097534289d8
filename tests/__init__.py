"""SafeAgent's test suite (a package, so child processes can import ``tests._workers``)."""
