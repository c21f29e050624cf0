"""What the engineers read: the bug book, the compile log, the export log, the performance report."""
