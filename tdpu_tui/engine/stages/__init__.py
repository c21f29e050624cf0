"""One module per pipeline stage, named after it, and the registry that orders them."""
