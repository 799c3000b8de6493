"""``python -m fastdiff train MODEL [options]``: train an embedded model from scratch (``digits``; ``shapes``: the
text-to-image UNet and text encoder; ``shapes-judge``: the detector that judges the ``shapes`` pipeline;
``shapes-vae``: its autoencoder; ``digits-repa-encoder``: the frozen encoder of representation alignment;
``shapes-onestep``: the one-step student of ``shapes``, its triplets then its training; ``shapes-consistency``: its
consistency student, trajectories then training)."""

from __future__ import annotations

import argparse
import shlex

from fastdiff.distill import text_consistency as train_shapes_consistency
from fastdiff.distill import text_student as train_shapes_onestep
from fastdiff.models import repa_encoder, train_digits
from fastdiff.models.shapes import train_unet as train_shapes
from fastdiff.models.shapes import train_vae as train_shapes_vae
from fastdiff.quality import train_shapes_judge

#: model name -> its trainer module (``add_arguments(parser)``, ``run(args, command)``)
TRAINERS = {"digits": train_digits, "shapes": train_shapes, "shapes-judge": train_shapes_judge,
            "shapes-vae": train_shapes_vae, "digits-repa-encoder": repa_encoder,
            "shapes-onestep": train_shapes_onestep, "shapes-consistency": train_shapes_consistency}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` with one sub-command per trainable model, each with its trainer's options."""
    p = subparsers.add_parser("train", description=__doc__, help="train an embedded model (digits, shapes, "
                              "shapes-judge, shapes-vae, digits-repa-encoder, shapes-onestep, "
                              "shapes-consistency)")
    models = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, trainer in TRAINERS.items():
        trainer.add_arguments(models.add_parser(name, help=f"train the embedded {name!r} model",
                                                description=trainer.__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def run(args: argparse.Namespace) -> int:
    command = "python -m fastdiff train " + shlex.join(args.command_argv)
    return TRAINERS[args.model].run(args, command=command)
