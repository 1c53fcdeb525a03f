"""Jobs over what is stored: publicToken repair, the reconciler, failed exchanges, key rotation."""
