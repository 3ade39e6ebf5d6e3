# selfsup: the pipeline on the embedded default dataset, run by a user of its own (not root). What outlives the
# container goes to the volume mounted at /out: the MLflow store (runs, metrics, pictures, the registry) and DVC's
# cache (every stage's outputs; its run cache restores unchanged stages on the next run):
#   docker build -t selfsup .
#   docker run --rm -v selfsup-out:/out selfsup
# The workspace's metrics/ and plots/ too: `docker run --rm -v selfsup-out:/out selfsup sh -c 'dvc repro && cp -r
# metrics plots /out/'`. A host folder instead of the named volume: build with `--build-arg USER_ID=$(id -u)` (the
# container's user must own it), then `mkdir -p out && docker run --rm -v "$PWD/out:/out" selfsup`.
# GPU image: `docker build --build-arg BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04 ...` (any base with python3.11+
# and venv), then `docker run --gpus all -v selfsup-out:/out ...` with `scaling.use_gpu: true`.
ARG BASE=python:3.11-slim
FROM ${BASE}
RUN (command -v git || (apt-get update && apt-get install -y --no-install-recommends git python3 python3-venv \
     && rm -rf /var/lib/apt/lists/*))
# USER_ID: the owner of a host folder mounted at /out. --non-unique: a base may have a user with that id already
# (ubuntu:24.04 has uid 1000).
ARG USER_ID=1000
RUN useradd --create-home --no-log-init --non-unique --uid "${USER_ID}" --user-group selfsup \
    && install -d -o selfsup -g selfsup /selfsup /out /out/mlartifacts /out/dvc-cache
WORKDIR /selfsup
USER selfsup
COPY --chown=selfsup:selfsup . .
# The README's install line: the same virtualenv, the same extras. pip leaves no cache in the image
# (PIP_NO_CACHE_DIR is pip's --no-cache-dir, keeping the line the README's).
ENV PIP_NO_CACHE_DIR=1
RUN python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"
ENV PATH=/selfsup/.venv/bin:$PATH
# dvc needs a git repository; a build context usually carries .git, else start one.
RUN git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A \
    && git -c user.name=selfsup -c user.email=selfsup@localhost commit -qm image)
# The state that outlives the container, in /out (outside the repository, where DVC would walk it): the MLflow
# store's database, its artifacts (selfsup keeps them in ./mlartifacts: a link), DVC's cache (.dvc/config.local).
ENV MLFLOW_TRACKING_URI=sqlite:////out/mlflow.db
RUN ln -s /out/mlartifacts mlartifacts && dvc config --local cache.dir /out/dvc-cache
CMD ["dvc", "repro"]
