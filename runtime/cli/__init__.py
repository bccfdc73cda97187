"""The entry points, each thin and on the typed config system of ``runtime.recipe.config``:
``run`` (envtune-run), ``evaluate`` (envtune-eval), ``serve`` (envtune-serve), and
``engine_stack``, which opens the engines for all of them."""
