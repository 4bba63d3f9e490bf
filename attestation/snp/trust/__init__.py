"""AMD root certificates shipped as package data (loaded by attestation.snp.roots)."""
