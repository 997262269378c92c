"""vibed: Vibe Cloud as one Twisted daemon."""
