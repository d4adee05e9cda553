"""Sweeps: Ray Tune over a job's config, every trial a whole metadist run.

- `plan`: sweep files (typed config), their plan against the base job, the sweep folder's state;
- `driver`: `metadist tune`, the Tune experiment, its MLflow parent run and its results;
- `trial`: one Tune trial, a metadist run reporting its validations to Tune;
- `results`: the results table, the best trial and its job file;
- `plots`: the sweep's figures.

Only `driver` and `trial` import Ray; `plan` is read before Ray starts, so a bad sweep fails fast.
"""
