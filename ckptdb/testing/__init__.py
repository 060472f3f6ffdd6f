"""Test-support tools shipped with ckptdb (the crash-state checker)."""
