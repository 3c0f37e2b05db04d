"""The User-Mode-Linux lab: real kernels with ESP, one per lab host, in a private network namespace.

    lab = rollout.lab.up()                    # or rollout.lab.load() for a lab that is already up
    lab.host("cp1001").run("swanctl --list-sas")
    rollout.lab.probe.count_packets(lab, "cp1001", "cp2001", "v4", 3.0)
    rollout.lab.down()
"""

from rollout.lab.host import LabHost
from rollout.lab.lab import DownReport, HostStatus, Lab, down, load, up
from rollout.lab.paths import LabPaths, default_state_dir
from rollout.lab.spec import HostSpec, LabSpec, build_spec

__all__ = [
    "DownReport", "HostSpec", "HostStatus", "Lab", "LabHost", "LabPaths", "LabSpec", "build_spec",
    "default_state_dir", "down", "load", "up",
]
