"""The distributed engine: the only package that imports deepspeed, ray or torch.distributed.

``run_training(job, trainer_cfg, ds_cfg, output_dir)`` (ray_job) runs a ``TrainJob`` (onerec_dist.training.engine_api)
on Ray Train workers with DeepSpeed ZeRO; ``run_sequence`` runs several in one worker group; ``DeepSpeedStrategy``
(strategy) owns every DeepSpeed call. deepspeed and ray are imported lazily, so importing this package is cheap.
"""


def run_training(job, trainer, ds, output_dir):
    from onerec_dist.distributed.ray_job import run_training as _run_training

    return _run_training(job, trainer, ds, output_dir)


def run_sequence(runs):
    from onerec_dist.distributed.ray_job import run_sequence as _run_sequence

    return _run_sequence(runs)
