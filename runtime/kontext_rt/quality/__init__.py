"""Quality measurement: a synthetic editing task (shapes), its metrics, and a harness that scores pipelines."""
