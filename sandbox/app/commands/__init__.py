"""One module per `sandbox` command; each defines `register(app)`. Heavy imports stay inside the
command functions so that `sandbox --help` does not load torch."""
