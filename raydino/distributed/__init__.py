"""Everything that touches Ray, in one place: the components never import it.

* `cluster`   the one `init_ray` (join RAY_ADDRESS or start a local Ray), Ray Data's quiet mode,
              and keeping Ray Train's per-report dumps off the terminal;
* `capacity`  can this cluster (or its autoscaler) ever host a run: checked before training;
* `trainer`   the TorchTrainer factory and what every Ray Train worker does first;
* `streaming` the Ray Data multi-crop stream over Parquet shards.

Ray's private modules are used here only (`capacity`: the autoscaler's published state), checked
against Ray 2.60 (`RAY_VERSION_CHECKED`); each use falls back to a safe answer if Ray changes them.
"""

RAY_VERSION_CHECKED = "2.60"
