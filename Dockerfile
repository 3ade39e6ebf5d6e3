# selfsup: `docker build -t selfsup .` then `docker run --rm selfsup` runs the pipeline on the
# embedded default dataset. GPU image: `docker build --build-arg BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04 ...`
# (any base with python3.11+ and venv), then `docker run --gpus all ...` with `scaling.use_gpu: true`.
ARG BASE=python:3.11-slim
FROM ${BASE}
RUN (command -v git || (apt-get update && apt-get install -y --no-install-recommends git python3 python3-venv \
     && rm -rf /var/lib/apt/lists/*))
WORKDIR /selfsup
COPY . .
# The README's install line: the same virtualenv, the same extras.
RUN python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"
ENV PATH=/selfsup/.venv/bin:$PATH
# dvc needs a git repository; a build context usually carries .git, else start one.
RUN git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A \
    && git -c user.name=selfsup -c user.email=selfsup@localhost commit -qm image)
CMD ["dvc", "repro"]
