"""The Environment Tuning recipe: config, curriculum, episodes, learner actor, and the run's artefacts
(metric sinks, progress display, trajectory log, export)."""
