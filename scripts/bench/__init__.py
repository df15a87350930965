"""Pieces shared by the benchmarks under scripts/ (machine measurements, img2img runs, inputs, tables; the
scale-out benchmark's launches, generation and DDP runs: ``scale_launch``, ``scale_generate``, ``scale_ddp``)."""
