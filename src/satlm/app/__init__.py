"""The application: the `satlm` commands' run config, train / compare / eval orchestration, the fault guard, the
interleaved speed measurement, fetch, plots and the embedded model's builder. It uses the library (satlm.config,
core, modeling, integrations) and satlm.data; nothing below imports it."""
