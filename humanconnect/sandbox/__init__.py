"""The sandbox: a local stand-in of the Human API and its Connect popup, for tests and trying it."""
