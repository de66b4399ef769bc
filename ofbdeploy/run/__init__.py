"""``ofbdeploy run`` in small parts, from the bottom up: where a run's files live (paths), the directory's
bookkeeping (rundir), what every stage works with (context), one record per stage (stages), the driver that
runs them (driver), the headline report built from their files (report), and the two ways other commands
use a finished run: as an export/profile target (target) and as a CI gate (gate).

Nothing is imported here, so that the light modules (gate, target's checks) do not pull in torch.
"""
