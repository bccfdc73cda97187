"""The Environment Tuning recipe on the generic runtime (see the README's file tree)."""
