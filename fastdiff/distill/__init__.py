"""Distillation of a teacher diffusion UNet into a one-step student.

``triplets``: (label, noise, teacher image) generation with the fast sampler, across processes (torchrun),
deterministic per sample and resumable. ``train``: the one-step student. ``coalescer_index`` / ``coalescer``: coalescer
networks (no teacher: a faiss index of the training pairs and a jump network). CLI: ``python -m fastdiff.distill``.
"""

from fastdiff.distill.train import init_student, onestep_scheduler_config, train_student
from fastdiff.distill.triplets import TripletSpec, generate_shards, load_triplets, merge_shards, run_distributed

__all__ = ["TripletSpec", "generate_shards", "init_student", "load_triplets", "merge_shards",
           "onestep_scheduler_config", "run_distributed", "train_student"]
