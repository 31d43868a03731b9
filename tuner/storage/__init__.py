"""The study database and the checkpoint store: URLs and retries, tuner's attr keys, artifacts."""
