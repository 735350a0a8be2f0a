"""A Cloud Run service that runs jobs pushed by Pub/Sub or Cloud Tasks.

    uvicorn main:push --host 0.0.0.0 --port $PORT

Dead letters and idempotency keys live in the app's broker and store: a Redis (Memorystore)
URL in AIOWORKERS_BROKER_URL for a service with several instances; the SQLite default only
suits one instance (--max-instances=1) with a volume.
"""

from __future__ import annotations

import os

import aioworkers

app = aioworkers.App(os.environ.get("AIOWORKERS_BROKER_URL", "sqlite:///jobs.db"))


@app.task(retries=5, timeout=120)
async def resize(image: str, width: int) -> None:
    job = aioworkers.current_job()
    print(f"resizing {image} to {width}px (job {job.id}, attempt {job.attempt})")


if os.environ.get("PUSH_AUDIENCE"):
    # Pub/Sub push or Cloud Tasks with an OIDC token of the given service account.
    auth = aioworkers.push.google_oidc(
        os.environ["PUSH_AUDIENCE"], email=os.environ.get("PUSH_SERVICE_ACCOUNT")
    )
else:
    auth = aioworkers.push.bearer_token(os.environ["PUSH_TOKEN"])

# Cloud Run's request timeout is 300 s by default: jobs are capped below it.
push = aioworkers.push_app(app, auth=auth, max_concurrency=80, timeout=270)
