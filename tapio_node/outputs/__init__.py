"""Where events go: stdout JSON lines, the journal, or nowhere."""
