# The tuner image: the CLI, PostgreSQL driver, optuna-dashboard, and gcc for Triton. PyPI's Linux torch
# wheels bundle the CUDA runtime, so workers use the GPUs that compose reserves for them (NVIDIA
# container toolkit).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler: Triton (torch.compile on CUDA, `compile: true` in a study) builds its launcher with
# one at run time; without it every compiled trial fails.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY tuner ./tuner
RUN pip install ".[postgres,s3]"
COPY studies ./studies

# Run as an unprivileged user; the volumes' mount points belong to it.
RUN useradd --create-home --uid 10001 tuner \
    && mkdir -p /artifacts /data \
    && chown tuner:tuner /artifacts /data
USER tuner

# SIGTERM (docker stop) ends the running trial at its next epoch boundary with a checkpoint.
STOPSIGNAL SIGTERM
CMD ["tuner", "--help"]
