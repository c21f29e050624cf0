"""FMSH's Icraft: the CLI driver, the op-support table and the precheck rules."""
