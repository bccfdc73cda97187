"""The Environment Tuning recipe on top of the generic runtime.

``config`` (the typed configs; ``config_io`` reads and writes them as TOML), ``curriculum`` (the
four-stage scheduler), ``episodes`` (task source, episode runner, validation), ``learner_actor``,
``evaluation`` (BFCL accuracy), ``training`` (one run wired top to bottom), and the run's artefacts:
``run_folder``, ``report``, ``sinks`` (metrics.jsonl, TensorBoard, W&B), ``progress`` (the terminal),
``trajectory_log`` and ``export``. Modules are imported by path: some pull torch, and the config
must not.
"""
