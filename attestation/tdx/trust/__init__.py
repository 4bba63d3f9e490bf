"""Intel trust anchors shipped with the package (Intel SGX Root CA, TCB Signing chain)."""
