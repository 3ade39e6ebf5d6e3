"""The registered encoder online, with Ray Serve: POST an image's bytes to /embed for its embedding, to /neighbours
for its nearest images in an index (`pipelines.search build`); GET /health says what is served.

Requests that arrive together are embedded in one batch (`@serve.batch`). The model is read from the MLflow
registry by alias (or pinned by version); each replica follows the alias with a thread that reads it every
`poll_s` seconds and, when it moved, loads the new version beside the old one and swaps: requests in flight finish
on the version they started with, none fails, and every answer names the version that made it. An index holds
one version's embeddings: when the served version is another, /neighbours answers 409 (rebuild the index), never
a mix of two spaces.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI reads the routes' annotations as types
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from selfsup.config import DataConfig
from selfsup.errors import SelfsupError
from selfsup.tracking import ModelVersionRef, resolve_model

logger = logging.getLogger("ray.serve")
api = FastAPI(title="selfsup encoder")


@dataclass(frozen=True)
class ServiceConfig:
    model_uri: str  # models:/NAME@ALIAS (followed) or models:/NAME/VERSION (fixed)
    tracking_uri: str
    index: str | None = None  # a folder `pipelines.search build` wrote
    replicas: int = 1
    cpus_per_replica: float = 1.0
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    poll_s: float = 1.0  # how often a replica reads the alias
    max_image_pixels: int = DataConfig().max_image_pixels


class BadRequest(Exception):
    """A request the service cannot answer; the message says what to send instead."""


@serve.deployment
@serve.ingress(api)
class EncoderService:
    def __init__(self, config: ServiceConfig):
        from selfsup.search import EmbeddingIndex

        self.config = config
        self.served = self._load(resolve_model(config.model_uri, config.tracking_uri))
        self.index = EmbeddingIndex.load(Path(config.index)) if config.index else None
        self._embed_batch.set_max_batch_size(config.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(config.batch_wait_s)
        self._stop = threading.Event()
        if "@" in config.model_uri:
            threading.Thread(target=self._follow_alias, daemon=True, name="follow-alias").start()

    def _load(self, ref: ModelVersionRef) -> tuple[ModelVersionRef, object]:
        import mlflow

        mlflow.set_tracking_uri(self.config.tracking_uri)
        return ref, mlflow.pyfunc.load_model(ref.uri)

    def _follow_alias(self) -> None:
        """Read the alias every poll_s; when it names another version, load that one, then swap (one assignment:
        a batch takes `self.served` once, so it is embedded by one version whole)."""
        while not self._stop.wait(self.config.poll_s):
            try:
                ref = resolve_model(self.config.model_uri, self.config.tracking_uri)
                if ref != self.served[0]:
                    self.served = self._load(ref)
                    logger.info("now serving %s version %s", ref.name, ref.version)
            except Exception as error:  # a registry that is briefly away: keep serving the version loaded
                logger.warning(
                    "could not follow %s (%s); still serving version %s",
                    self.config.model_uri,
                    error,
                    self.served[0].version,
                )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, images: list[np.ndarray]) -> list[tuple[ModelVersionRef, np.ndarray]]:
        ref, model = self.served
        embeddings = await asyncio.to_thread(model.predict, images)  # any sizes: the model resizes each
        return [(ref, embedding) for embedding in embeddings]

    async def _image(self, request: Request) -> np.ndarray:
        from selfsup.data.sources import decode_image_bytes, max_file_bytes

        data = await request.body()
        if not data:
            raise BadRequest("empty request: POST an image file's bytes (JPEG, PNG, ...) as the body")
        if len(data) > max_file_bytes(self.config.max_image_pixels):
            raise BadRequest(f"{len(data):,} bytes: more than an image within {self.config.max_image_pixels:,} pixels")
        try:
            return await asyncio.to_thread(
                lambda: decode_image_bytes(data, self.config.max_image_pixels).permute(1, 2, 0).numpy()
            )
        except Exception as error:  # _Unreadable, saying why
            raise BadRequest(f"the body is not an image this service can read ({error})") from None

    @api.post("/embed")
    async def embed(self, request: Request):
        try:
            ref, embedding = await self._embed_batch(await self._image(request))
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return {"model": ref.name, "version": ref.version, "embedding": embedding.tolist()}

    @api.post("/neighbours")
    async def neighbours(self, request: Request, k: int = 10):
        if self.index is None:
            return JSONResponse({"error": "no index: start the service with --index"}, status_code=404)
        if not 1 <= k <= 1000:
            return JSONResponse({"error": f"k={k}: ask for 1 to 1000 neighbours"}, status_code=400)
        try:
            ref, embedding = await self._embed_batch(await self._image(request))
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        try:
            scores, rows = self.index.search(embedding[None], k, ref)
        except SelfsupError as error:  # the alias moved past the index's version
            return JSONResponse({"error": str(error)}, status_code=409)
        found = [{"path": self.index.paths[row], "score": float(s)} for s, row in zip(scores[0], rows[0]) if row >= 0]
        return {"model": ref.name, "version": ref.version, "neighbours": found}

    @api.get("/health")
    async def health(self):
        ref = self.served[0]
        index = self.index.meta if self.index else None
        return {
            "model": ref.name,
            "version": ref.version,
            "follows": self.config.model_uri if "@" in self.config.model_uri else None,
            "index": {"version": index.version, "images": index.count} if index else None,
        }


def start(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the service on the Ray instance this process is connected to; returns its URL."""
    serve.start(http_options={"host": host, "port": port})
    deployment = EncoderService.options(
        num_replicas=config.replicas,
        # Serve's default (5 requests in a replica at once) would cap every batch at 5: let two batches' worth in.
        max_ongoing_requests=2 * config.max_batch_size,
        ray_actor_options={"num_cpus": config.cpus_per_replica},
    )
    serve.run(deployment.bind(config), name="selfsup", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
