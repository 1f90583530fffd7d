"""Admin of conversations (filled in by the conversations feature)."""
