"""Batch jobs, YAML configs and the ``recdistill`` command line."""
