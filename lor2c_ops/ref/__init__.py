"""Pure-PyTorch implementations: the oracle for tests and the last-resort fallback backend."""
