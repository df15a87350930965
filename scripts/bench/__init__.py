"""Pieces shared by the benchmarks under scripts/ (machine measurements, img2img runs, inputs, tables)."""
