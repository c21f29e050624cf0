"""The operating system behind small functions: atomic writes and locks, tailing files, platform seams."""
