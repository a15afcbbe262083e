"""Job submission for onerec-dist (Ray Jobs, SLURM, KubeRay, local); installs as `onerec_launch`."""
