"""Start piip6b under srun, torchrun or as a plain process: `python -m launch <piip6b args...>`.

The only package besides `slurm/` that knows about Slurm: it turns SLURM_* into the torch env://
variables that piip6b reads, then runs the piip6b command line in the same process.
"""

from launch.dist_defaults import ProcessGroupOptions, apply_env_defaults, process_group_options
from launch.env import DistEnv, LaunchEnvError, derive_master_port, detect, export

__all__ = [
    "DistEnv",
    "LaunchEnvError",
    "ProcessGroupOptions",
    "apply_env_defaults",
    "derive_master_port",
    "detect",
    "export",
    "process_group_options",
]
