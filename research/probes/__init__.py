"""One-off probes of the MiniLM calibration: run each as ``python -m research.probes.<name>``."""
